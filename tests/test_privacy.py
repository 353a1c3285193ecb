"""DP-FedAvg: clipping, noise scale and the privacy accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError, ReplyRejected
from quorum.tasks.privacy import PrivacyAccountant, add_gaussian_noise, budget_exceeded, clip_update, epsilon_spent


def f32(values: object) -> NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def norm(update: list[NDArray[np.float32]]) -> float:
    return math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in update))


# --- clipping ------------------------------------------------------------------------------------


def test_clipping_bounds_the_norm_of_the_whole_update() -> None:
    update = [f32([[3.0, 0.0], [0.0, 0.0]]), f32([4.0])]  # norm 5

    clipped = clip_update(update, clip_norm=1.0)

    assert norm(clipped) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped[0], [[0.6, 0.0], [0.0, 0.0]], rtol=1e-6)  # direction kept
    np.testing.assert_allclose(clipped[1], [0.8], rtol=1e-6)


def test_a_short_update_passes_unchanged_as_a_copy() -> None:
    update = [f32([0.3, -0.4])]

    (clipped,) = clip_update(update, clip_norm=1.0)

    np.testing.assert_array_equal(clipped, update[0])
    assert not np.shares_memory(clipped, update[0])


def test_clipping_many_random_updates_never_exceeds_the_bound() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        update = [f32(rng.normal(scale=rng.uniform(0.01, 10), size=s)) for s in [(5, 3), (3,)]]
        assert norm(clip_update(update, 0.7)) <= 0.7 * (1 + 1e-6)


@pytest.mark.parametrize(
    ("update", "clip_norm", "error"),
    [
        ([f32([1.0])], 0.0, ConfigError),  # a zero bound clips everything to nothing
        ([f32([np.nan])], 1.0, ReplyRejected),  # a diverged update has no norm
    ],
    ids=["zero-bound", "nan"],
)
def test_clipping_rejects_bad_input(
    update: list[NDArray[np.float32]], clip_norm: float, error: type[Exception]
) -> None:
    with pytest.raises(error):
        clip_update(update, clip_norm)


# --- noise ---------------------------------------------------------------------------------------


def test_noise_std_is_multiplier_times_clip_over_sites() -> None:
    delta = [np.zeros((200, 100), dtype=np.float32), np.zeros(1000, dtype=np.float32)]

    noised = add_gaussian_noise(delta, noise_multiplier=1.2, clip_norm=0.5, num_sites=4, rng=np.random.default_rng(1))

    draws = np.concatenate([t.ravel() for t in noised])
    assert draws.std() == pytest.approx(1.2 * 0.5 / 4, rel=0.02)
    assert abs(draws.mean()) < 0.005


def test_noise_is_reproducible_from_the_generator_and_leaves_the_input_alone() -> None:
    delta = [f32([1.0, 2.0, 3.0])]

    first = add_gaussian_noise(delta, 1.0, 1.0, 2, np.random.default_rng(9))
    second = add_gaussian_noise(delta, 1.0, 1.0, 2, np.random.default_rng(9))

    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(delta[0], [1.0, 2.0, 3.0])


# --- accounting ----------------------------------------------------------------------------------


def test_epsilon_grows_with_steps() -> None:
    spent = [epsilon_spent(1.1, 0.1, steps, 1e-5) for steps in (1, 10, 100, 1000)]

    assert spent == sorted(spent)
    assert len(set(spent)) == 4


def test_epsilon_shrinks_with_more_noise() -> None:
    spent = [epsilon_spent(z, 0.1, 100, 1e-5) for z in (0.8, 1.0, 2.0, 4.0)]

    assert spent == sorted(spent, reverse=True)


def test_epsilon_matches_the_librarys_own_reference_value() -> None:
    # dp_accounting/rdp/rdp_privacy_accountant_test.py, test_compute_epsilon_delta_gaussian: one full-batch
    # Gaussian with noise multiplier 4.530877117 is exactly (1, 1e-6)-DP.
    assert epsilon_spent(4.530877117, 1.0, 1, 1e-6) == pytest.approx(1.0, abs=1e-3)


def test_no_rounds_spend_nothing_and_no_noise_spends_everything() -> None:
    assert epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon_spent(0.0, 0.1, 5, 1e-5) == math.inf


@pytest.mark.parametrize(
    "arguments",
    [
        (1.0, 0.0, 10, 1e-5),  # nobody sampled
        (1.0, 1.5, 10, 1e-5),  # a rate above one
        (1.0, 0.1, -1, 1e-5),  # negative rounds
        (1.0, 0.1, 10, 0.0),  # delta zero: pure DP is not what a Gaussian gives
        (-1.0, 0.1, 10, 1e-5),  # negative noise
    ],
)
def test_epsilon_rejects_bad_arguments(arguments: tuple[float, float, int, float]) -> None:
    with pytest.raises(ConfigError):
        epsilon_spent(*arguments)


def test_budget_exceeded() -> None:
    assert not budget_exceeded(2.9, 3.0)
    assert not budget_exceeded(3.0, 3.0)
    assert budget_exceeded(3.1, 3.0)
    assert budget_exceeded(math.nan, 3.0)


def test_accountant_advances_as_a_new_value() -> None:
    start = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.1, delta=1e-5, budget_epsilon=3.0)

    later = start.after(5)
    much_later = later.after(500)

    assert start.steps == 0 and start.epsilon == 0.0
    assert later.steps == 5
    assert 0 < later.epsilon < much_later.epsilon
    assert not later.exceeded
    assert much_later.exceeded
