"""FedProx: the proximal term keeps a site's local model near the global one."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError
from quorum.tasks.model import initial_weights
from quorum.tasks.training import LocalTrainingConfig, train_local

HIDDEN = (8,)


def site_data() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """A skewed site: shifted features and a rule of its own, so local training drifts far."""
    rng = np.random.default_rng(4)
    features = (rng.normal(size=(300, 5)) + 1.5).astype(np.float32)
    labels = (features[:, 0] - features[:, 3] > 0).astype(np.float32)
    return features, labels


def config(mu: float) -> LocalTrainingConfig:
    return LocalTrainingConfig(
        hidden_sizes=HIDDEN,
        dropout=0.0,
        local_epochs=5,
        batch_size=32,
        learning_rate=0.1,
        balanced=False,
        seed=11,
        proximal_mu=mu,
    )


def distance(a: list[NDArray[np.float32]], b: list[NDArray[np.float32]]) -> float:
    return float(np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b, strict=True))))


def test_proximal_term_keeps_weights_closer_to_the_global_model() -> None:
    features, labels = site_data()
    start = initial_weights(5, HIDDEN, np.zeros(5), np.ones(5), seed=0)

    free = train_local(start, features, labels, config(0.0))
    prox = train_local(start, features, labels, config(1.0))

    assert distance(prox.weights, start) < 0.8 * distance(free.weights, start)
    for buffer in (0, 1):  # the scaling buffers are not parameters and must not move
        np.testing.assert_array_equal(prox.weights[buffer], start[buffer])


def test_zero_mu_is_the_default_behaviour() -> None:
    features, labels = site_data()
    start = initial_weights(5, HIDDEN, np.zeros(5), np.ones(5), seed=0)

    explicit = train_local(start, features, labels, config(0.0))
    implicit = train_local(
        start,
        features,
        labels,
        LocalTrainingConfig(
            hidden_sizes=HIDDEN, dropout=0.0, local_epochs=5, batch_size=32, learning_rate=0.1, balanced=False, seed=11
        ),
    )

    for got, want in zip(explicit.weights, implicit.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert explicit.train_loss == implicit.train_loss


def test_negative_mu_is_refused() -> None:
    with pytest.raises(ConfigError, match="proximal_mu"):
        config(-0.1)
