"""Robust aggregation rules, server optimizers, site sampling and update-norm screening."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError, NotEnoughSites, ReplyRejected
from quorum.tasks.aggregate import fedavg
from quorum.tasks.strategies import (
    ServerOptimizerState,
    aggregate,
    coordinate_median,
    krum,
    sample_sites,
    server_update,
    trainable_mask,
    trimmed_mean,
    update_norm_outliers,
)

Reply = tuple[list[NDArray[np.float32]], int]


def f32(values: object) -> NDArray[np.float32]:
    return np.asarray(values, dtype=np.float32)


def snapshot(replies: list[Reply]) -> list[NDArray[np.float32]]:
    return [layer.copy() for weights, _ in replies for layer in weights]


def assert_unchanged(replies: list[Reply], before: list[NDArray[np.float32]]) -> None:
    for layer, saved in zip([layer for weights, _ in replies for layer in weights], before, strict=True):
        np.testing.assert_array_equal(layer, saved)


LITERAL: list[Reply] = [
    ([f32([[1.0, 10.0]]), f32([0.0])], 1),
    ([f32([[2.0, 20.0]]), f32([1.0])], 1),
    ([f32([[3.0, 30.0]]), f32([2.0])], 1),
    ([f32([[4.0, 40.0]]), f32([3.0])], 1),
    ([f32([[100.0, -50.0]]), f32([4.0])], 100),  # an outlier that also claims many examples
]


# --- rules on literal inputs ---------------------------------------------------------------------


def test_median_per_coordinate_ignores_counts() -> None:
    result = coordinate_median(LITERAL)

    np.testing.assert_allclose(result[0], [[3.0, 20.0]])
    np.testing.assert_allclose(result[1], [2.0])
    assert [layer.dtype for layer in result] == [np.float32, np.float32]


def test_median_of_an_even_count_averages_the_middle_pair() -> None:
    (layer,) = coordinate_median([([f32([1.0])], 1), ([f32([2.0])], 1), ([f32([4.0])], 1), ([f32([9.0])], 1)])

    np.testing.assert_allclose(layer, [3.0])


def test_trimmed_mean_drops_each_end() -> None:
    result = trimmed_mean(LITERAL, trim_fraction=0.2)  # floor(0.2 * 5) = 1 from each end

    np.testing.assert_allclose(result[0], [[3.0, 20.0]])  # mean(2, 3, 4) and mean(10, 20, 30)
    np.testing.assert_allclose(result[1], [2.0])


def test_trimmed_mean_with_zero_trim_is_the_plain_mean() -> None:
    result = trimmed_mean(LITERAL, trim_fraction=0.0)

    np.testing.assert_allclose(result[0], [[22.0, 10.0]])


def test_trimmed_mean_of_half_an_odd_count_is_the_median() -> None:
    replies: list[Reply] = [([f32([v])], 1) for v in (5.0, 1.0, 100.0)]

    (layer,) = trimmed_mean(replies, 0.5)

    np.testing.assert_allclose(layer, [5.0])


@pytest.mark.parametrize(
    ("num_sites", "fraction", "error"),
    [
        (4, 0.6, ConfigError),  # more than half from each end
        (4, -0.1, ConfigError),  # a negative trim makes no sense
        (4, 0.5, ReplyRejected),  # 2 from each end of 4 leaves nothing to average
        (0, 0.1, ReplyRejected),  # no replies at all
    ],
)
def test_trimmed_mean_rejects_what_leaves_nothing(num_sites: int, fraction: float, error: type[Exception]) -> None:
    replies: list[Reply] = [([f32([float(i)])], 1) for i in range(num_sites)]

    with pytest.raises(error) as caught:
        trimmed_mean(replies, fraction)

    assert caught.value.fix  # type: ignore[attr-defined]


def test_krum_picks_the_reply_closest_to_its_neighbours() -> None:
    replies: list[Reply] = [
        ([f32([0.0, 0.0])], 10),
        ([f32([0.1, 0.0])], 10),
        ([f32([0.0, 0.1])], 10),
        ([f32([0.05, 0.05])], 10),  # the centre of the honest cluster
        ([f32([0.1, 0.1])], 10),
        ([f32([50.0, -50.0])], 10),  # byzantine
    ]

    (chosen,) = krum(replies, num_byzantine=1)

    np.testing.assert_allclose(chosen, [0.05, 0.05])


def test_multi_krum_averages_the_best_and_leaves_out_the_attacker() -> None:
    replies: list[Reply] = [
        ([f32([1.0])], 1),
        ([f32([1.2])], 1),
        ([f32([0.8])], 1),
        ([f32([1.1])], 1),
        ([f32([0.9])], 1),
        ([f32([-100.0])], 1),
    ]

    (averaged,) = krum(replies, num_byzantine=1, multi=3)

    np.testing.assert_allclose(averaged, [1.0], atol=1e-6)  # 1.0, 1.1 and 0.9 score best


@pytest.mark.parametrize(
    ("num_sites", "num_byzantine"),
    [
        (4, 1),  # 4 <= 2*1 + 2: Krum cannot tell the attacker from the honest
        (6, 2),  # 6 <= 2*2 + 2
        (2, 0),  # 2 <= 0 + 2: no neighbours to score against
    ],
)
def test_krum_precondition_names_the_fix(num_sites: int, num_byzantine: int) -> None:
    replies = [([f32([float(i)])], 1) for i in range(num_sites)]

    with pytest.raises(ReplyRejected) as caught:
        krum(replies, num_byzantine)

    assert "2f + 2" in caught.value.message
    assert "median" in caught.value.fix  # an alternative rule is always offered


def test_aggregate_dispatches_every_rule() -> None:
    knobs = {"trim_fraction": 0.2, "num_byzantine": 1, "multi_krum_m": 2}

    mean = aggregate("mean", LITERAL, **knobs)  # type: ignore[arg-type]
    median = aggregate("median", LITERAL, **knobs)  # type: ignore[arg-type]
    trimmed = aggregate("trimmed_mean", LITERAL, **knobs)  # type: ignore[arg-type]
    single = aggregate("krum", LITERAL, **knobs)  # type: ignore[arg-type]
    multi = aggregate("multi_krum", LITERAL, **knobs)  # type: ignore[arg-type]

    np.testing.assert_allclose(mean[0], fedavg(LITERAL)[0])
    np.testing.assert_allclose(median[0], [[3.0, 20.0]])
    np.testing.assert_allclose(trimmed[0], [[3.0, 20.0]])
    assert single[0][0, 0] in (1.0, 2.0, 3.0, 4.0)
    assert multi[0][0, 0] < 5.0


def test_aggregate_rejects_an_unknown_rule() -> None:
    with pytest.raises(ConfigError, match="multi_krum"):
        aggregate("mode", LITERAL, trim_fraction=0.1, num_byzantine=0, multi_krum_m=1)  # type: ignore[arg-type]


def test_rules_reject_mismatched_shapes() -> None:
    replies: list[Reply] = [([f32([1.0, 2.0])], 1), ([f32([1.0])], 1)]

    with pytest.raises(ReplyRejected, match="reply 1"):
        coordinate_median(replies)


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "krum", "multi_krum"])
def test_rules_do_not_mutate_inputs(rule: str) -> None:
    replies = [([layer.copy() for layer in weights], n) for weights, n in LITERAL]
    before = snapshot(replies)

    result = aggregate(rule, replies, trim_fraction=0.2, num_byzantine=1, multi_krum_m=2)  # type: ignore[arg-type]
    result[0][...] = 999.0

    assert_unchanged(replies, before)


# --- robustness to one scaled malicious update among 8 ------------------------------------------


def rms(a: NDArray[np.float32], b: NDArray[np.float32]) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum"])
def test_robust_rules_shrug_off_a_scaled_update(rule: str) -> None:
    sigma = 0.05  # the honest sites' spread around a common model
    rng = np.random.default_rng(7)
    centre = [rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)]
    honest: list[Reply] = [
        ([(c + sigma * rng.normal(size=c.shape)).astype(np.float32) for c in centre], 100) for _ in range(7)
    ]
    malicious: Reply = ([-50.0 * layer for layer in honest[0][0]], 100)
    clean_mean = fedavg(honest)

    robust = aggregate(rule, [*honest, malicious], trim_fraction=0.125, num_byzantine=1, multi_krum_m=4)  # type: ignore[arg-type]
    naive = fedavg([*honest, malicious])

    for got, want in zip(robust, clean_mean, strict=True):
        assert rms(got, want) < 2 * sigma  # within the honest sites' own spread
    assert rms(naive[0], clean_mean[0]) > 1.0  # while the attack works on plain FedAvg


# --- server optimizers ---------------------------------------------------------------------------

GLOBAL = [f32([0.5, 2.0]), f32([1.0, 1.0]), f32([[0.0, 0.0], [0.0, 0.0]]), f32([0.0])]
AGGREGATED = [f32([0.6, 2.5]), f32([1.5, 0.5]), f32([[1.0, -1.0], [0.5, 0.0]]), f32([2.0])]
MASK = trainable_mask(len(GLOBAL))


def step(
    kind: str, state: ServerOptimizerState, **knobs: float
) -> tuple[list[NDArray[np.float32]], ServerOptimizerState]:
    settings = {"server_lr": 1.0, "beta1": 0.0, "beta2": 0.99, "tau": 1e-3, **knobs}
    return server_update(kind, GLOBAL, AGGREGATED, state, trainable=MASK, **settings)  # type: ignore[arg-type]


def test_trainable_mask_matches_the_model() -> None:
    from quorum.tasks.model import build_model

    model = build_model(3, (4,))
    parameters = {id(p) for p in model.parameters()}
    expected = [id(t) in parameters for t in model.state_dict(keep_vars=True).values()]

    assert trainable_mask(len(expected)) == expected


def test_fedavg_returns_the_aggregate() -> None:
    new, state = step("fedavg", ServerOptimizerState())

    for got, want in zip(new, AGGREGATED, strict=True):
        np.testing.assert_array_equal(got, want)
    assert state.step == 1


def test_fedavgm_without_momentum_is_fedavg() -> None:
    state = ServerOptimizerState()
    for _ in range(3):  # also on later rounds, once a (zero-weighted) momentum exists
        new, state = step("fedavgm", state, beta1=0.0, server_lr=1.0)

        for got, want in zip(new, AGGREGATED, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-7)


def test_fedavgm_momentum_accumulates() -> None:
    first, state = step("fedavgm", ServerOptimizerState(), beta1=0.9, server_lr=1.0)
    second, _ = step("fedavgm", state, beta1=0.9, server_lr=1.0)

    # round 2 momentum = 0.9 * g + g = 1.9 g, so the step is 1.9 times longer than round 1's
    np.testing.assert_allclose(GLOBAL[2] - second[2], 1.9 * (GLOBAL[2] - first[2]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_move_towards_the_aggregate(kind: str) -> None:
    new, state = step(kind, ServerOptimizerState(), beta1=0.9, server_lr=0.1)

    for index in (2, 3):  # trainable tensors
        direction = AGGREGATED[index] - GLOBAL[index]
        moved = new[index] - GLOBAL[index]
        assert float(np.vdot(moved, direction)) > 0
        assert np.all(np.abs(moved) <= np.abs(direction) + 0.1 + 1e-6)
    assert state.step == 1
    assert len(state.momentum) == len(state.second_moment) == len(GLOBAL)


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
def test_buffers_pass_through_untouched(kind: str) -> None:
    new, state = step(kind, ServerOptimizerState(), beta1=0.9, server_lr=0.5)
    new, _ = step(kind, state, beta1=0.9, server_lr=0.5)

    np.testing.assert_array_equal(new[0], AGGREGATED[0])
    np.testing.assert_array_equal(new[1], AGGREGATED[1])
    assert not np.shares_memory(new[0], AGGREGATED[0])


@pytest.mark.parametrize("kind", ["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_server_update_mutates_nothing(kind: str) -> None:
    _, state = step(kind, ServerOptimizerState(), beta1=0.9)
    saved_state = [a.copy() for a in (*state.momentum, *state.second_moment)]
    saved = [a.copy() for a in (*GLOBAL, *AGGREGATED)]

    step(kind, state, beta1=0.9)

    for got, want in zip((*GLOBAL, *AGGREGATED), saved, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip((*state.momentum, *state.second_moment), saved_state, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "knobs",
    [
        {"server_lr": 0.0},  # no step at all
        {"beta1": 1.0},  # momentum that never forgets
        {"beta2": -0.1},  # negative decay
        {"tau": 0.0},  # division by sqrt(v) alone can blow up
    ],
)
def test_server_update_rejects_bad_knobs(knobs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        step("fedadam", ServerOptimizerState(), **knobs)


# --- sampling ------------------------------------------------------------------------------------

SITES = [f"site-{i}" for i in range(10)]


def test_sampling_is_seeded_deterministic_and_sorted() -> None:
    first = sample_sites(SITES, 0.3, 1, server_round=4, seed=11)
    again = sample_sites(list(reversed(SITES)), 0.3, 1, server_round=4, seed=11)

    assert first == again
    assert list(first) == sorted(first)
    assert len(first) == 3


def test_sampling_differs_across_rounds() -> None:
    picks = {sample_sites(SITES, 0.3, 1, server_round=r, seed=11) for r in range(1, 11)}

    assert len(picks) > 1


def test_sampling_respects_min_sites() -> None:
    assert len(sample_sites(SITES, 0.1, 4, server_round=1, seed=0)) == 4
    assert sample_sites(SITES, 1.0, 1, server_round=1, seed=0) == tuple(sorted(SITES))


@pytest.mark.parametrize(
    ("fraction", "min_sites", "error"),
    [
        (0.0, 1, ConfigError),  # nobody would be asked
        (1.5, 1, ConfigError),  # more than everyone
        (0.5, 11, NotEnoughSites),  # min_sites above the federation's size
    ],
)
def test_sampling_rejects_impossible_requests(fraction: float, min_sites: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        sample_sites(SITES, fraction, min_sites, server_round=1, seed=0)


# --- update norm outliers ------------------------------------------------------------------------


def test_a_far_update_is_flagged_and_normal_ones_are_not() -> None:
    base = [f32([0.0, 0.0, 0.0]), f32([1.0])]
    rng = np.random.default_rng(3)
    replies = {f"s{i}": [base[0] + f32(0.1 * rng.normal(size=3)), base[1]] for i in range(5)}
    replies["evil"] = [base[0] + f32([30.0, -30.0, 30.0]), base[1]]

    flagged = update_norm_outliers(replies, base, max_norm_ratio=5.0)

    assert set(flagged) == {"evil"}
    assert "median of the other sites" in flagged["evil"]


def test_norm_screen_flags_nan_and_shape_mismatch() -> None:
    base = [f32([0.0, 0.0])]
    replies = {"a": [f32([0.1, 0.0])], "b": [f32([0.0, 0.1])], "nan": [f32([np.nan, 0.0])], "shape": [f32([0.0])]}

    flagged = update_norm_outliers(replies, base, max_norm_ratio=5.0)

    assert set(flagged) == {"nan", "shape"}


def test_norm_screen_does_not_mutate_inputs() -> None:
    base = [f32([0.0, 0.0])]
    replies = {"a": [f32([0.1, 0.0])], "b": [f32([0.0, 0.1])], "c": [f32([9.0, 9.0])]}
    saved = {k: [w.copy() for w in v] for k, v in replies.items()}

    update_norm_outliers(replies, base, max_norm_ratio=3.0)

    for key, weights in replies.items():
        for got, want in zip(weights, saved[key], strict=True):
            np.testing.assert_array_equal(got, want)
