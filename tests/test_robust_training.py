"""Real local training with one of eight sites sending garbage every round.

Garbage the reply checks can see (NaN, wrong shape, no examples) is rejected; a scaled update passes
them and is neutralized by a robust rule. Either way the model ends within one accuracy point of a
run where every site behaved.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from numpy.typing import NDArray

from quorum.tasks.model import Weights, initial_weights
from quorum.tasks.replies import validate_reply
from quorum.tasks.site import SiteUpdate
from quorum.tasks.strategies import AggregationRule, aggregate
from quorum.tasks.training import LocalTrainingConfig, predict_scores, train_local

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_SITES, ROWS, FEATURES, ROUNDS = 8, 400, 8, 5
HIDDEN = (16,)
ATTACKER = "site-7"
SITE_IDS = [f"site-{i}" for i in range(NUM_SITES)]
Data = dict[str, tuple[NDArray[np.float32], NDArray[np.float32]]]


def make_data() -> tuple[Data, NDArray[np.float32], NDArray[np.float32]]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=FEATURES)

    def rows(count: int, shift: float) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        x = rng.normal(size=(count, FEATURES))
        x[:, :2] += shift
        y = (x @ w + 0.3 * rng.normal(size=count) > 0).astype(np.float32)
        return x.astype(np.float32), y

    sites = {site_id: rows(ROWS, 0.2 * index) for index, site_id in enumerate(SITE_IDS)}
    test_x, test_y = rows(2000, 0.7)
    return sites, test_x, test_y


def honest_update(site_id: str, data: Data, weights: Weights, server_round: int) -> SiteUpdate:
    local = LocalTrainingConfig(
        hidden_sizes=HIDDEN,
        dropout=0.0,
        local_epochs=1,
        batch_size=32,
        learning_rate=0.1,
        balanced=False,
        seed=1_000 * server_round + SITE_IDS.index(site_id),
    )
    result = train_local(weights, *data[site_id], local)
    return SiteUpdate(site_id, server_round, result.weights, result.num_examples, result.train_loss)


Garbage = Callable[[SiteUpdate, Weights], SiteUpdate]


def scaled(update: SiteUpdate, current: Weights) -> SiteUpdate:
    weights = [g + 50.0 * (w - g) for w, g in zip(update.weights, current, strict=True)]
    return SiteUpdate(update.site_id, update.server_round, weights, update.num_examples, update.train_loss)


def nan(update: SiteUpdate, current: Weights) -> SiteUpdate:
    weights = [w.copy() for w in update.weights]
    weights[-2][0, 0] = np.nan
    return SiteUpdate(update.site_id, update.server_round, weights, update.num_examples, update.train_loss)


def wrong_shape(update: SiteUpdate, current: Weights) -> SiteUpdate:
    weights = [*update.weights[:-1], np.zeros(3, dtype=np.float32)]
    return SiteUpdate(update.site_id, update.server_round, weights, update.num_examples, update.train_loss)


def zero_examples(update: SiteUpdate, current: Weights) -> SiteUpdate:
    return SiteUpdate(update.site_id, update.server_round, update.weights, 0, update.train_loss)


def run(data: Data, rule: AggregationRule, garbage: Garbage | None) -> tuple[Weights, list[dict[str, str]]]:
    weights = initial_weights(FEATURES, HIDDEN, np.zeros(FEATURES), np.ones(FEATURES), seed=3)
    rejections = []
    for server_round in range(1, ROUNDS + 1):
        replies = {s: honest_update(s, data, weights, server_round) for s in SITE_IDS}
        if garbage is not None:
            replies[ATTACKER] = garbage(replies[ATTACKER], weights)
        rejected = {s: r for s, u in replies.items() if (r := validate_reply(u, weights, server_round, s))}
        accepted = [(u.weights, u.num_examples) for s, u in replies.items() if s not in rejected]
        weights = aggregate(rule, accepted, trim_fraction=0.125, num_byzantine=1, multi_krum_m=1)
        rejections.append(rejected)
    return weights, rejections


def accuracy(weights: Weights, x: NDArray[np.float32], y: NDArray[np.float32]) -> float:
    return float(np.mean((predict_scores(weights, x, HIDDEN) >= 0.5) == y))


@pytest.fixture(scope="module")
def federation() -> tuple[Data, NDArray[np.float32], NDArray[np.float32], float]:
    data, test_x, test_y = make_data()
    clean, _ = run(data, "mean", None)
    return data, test_x, test_y, accuracy(clean, test_x, test_y)


@pytest.mark.parametrize(
    ("garbage", "rule", "rejected"),
    [
        (nan, "mean", True),  # diverged training: caught by the reply checks
        (wrong_shape, "mean", True),  # another architecture: caught by the reply checks
        (zero_examples, "mean", True),  # trained on nothing: caught by the reply checks
        (scaled, "median", False),  # a boosted update passes the checks; the median ignores it
        (scaled, "trimmed_mean", False),  # the same, with one value trimmed from each end
    ],
    ids=["nan", "wrong-shape", "zero-examples", "scaled-median", "scaled-trimmed-mean"],
)
def test_one_garbage_site_does_not_hurt_the_model(
    federation: tuple[Data, NDArray[np.float32], NDArray[np.float32], float],
    garbage: Garbage,
    rule: AggregationRule,
    rejected: bool,
) -> None:
    data, test_x, test_y, clean_accuracy = federation

    weights, rejections = run(data, rule, garbage)

    assert all((ATTACKER in r) == rejected and len(r) == int(rejected) for r in rejections)
    assert clean_accuracy > 0.8  # the clean run learned something worth protecting
    assert abs(accuracy(weights, test_x, test_y) - clean_accuracy) <= 0.01


def test_the_scaled_update_does_hurt_plain_fedavg(
    federation: tuple[Data, NDArray[np.float32], NDArray[np.float32], float],
) -> None:
    data, test_x, test_y, clean_accuracy = federation

    weights, _ = run(data, "mean", scaled)

    assert accuracy(weights, test_x, test_y) < clean_accuracy - 0.01
