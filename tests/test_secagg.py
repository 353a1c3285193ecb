"""Secure aggregation: masks cancel in the sum, hide each update, survive dropouts, and differ per round."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected
from quorum.tasks.aggregate import fedavg
from quorum.tasks.secagg import (
    FIELD,
    FieldSum,
    add,
    clip,
    decode,
    default_num_shares,
    encode,
    flatten,
    in_field,
    plan_round,
    prg,
    subtract,
    threshold_for,
    unflatten,
)
from quorum.tasks.secagg_protocol import checked_mean_delta
from tests.secagg_harness import JOB, Round, fixed_site, plain_mean, run_round

SITE_IDS = ("alpha", "bravo", "charlie", "delta", "echo")


def make_updates() -> dict[str, tuple[list[NDArray[np.float32]], int]]:
    rng = np.random.default_rng(5)
    return {
        site_id: (
            [rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)],
            int(rng.integers(50, 500)),
        )
        for site_id in SITE_IDS
    }


def vectors_and_weights() -> tuple[dict[str, NDArray[np.float64]], dict[str, int]]:
    updates = make_updates()
    return {s: flatten(u[0]) for s, u in updates.items()}, {s: u[1] for s, u in updates.items()}


# --- the field --------------------------------------------------------------------------------------


def test_flatten_and_unflatten_round_trip() -> None:
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7.5], dtype=np.float32)]

    back = unflatten(flatten(weights), [w.shape for w in weights])

    for got, want in zip(back, weights, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.float32


def test_fixed_point_encoding_round_trips_within_its_resolution() -> None:
    values = np.array([0.0, -1.5, 3.14159, -1e6, 2.0**-20], dtype=np.float64)

    encoded = encode(values)

    assert in_field(encoded)
    np.testing.assert_allclose(decode(encoded), values, atol=2.0**-25)


@pytest.mark.parametrize(
    "values",
    [
        np.array([np.nan]),  # diverged training
        np.array([2.0**29]),  # beyond the fixed-point range: a sum of sites could wrap in the field
    ],
    ids=["nan", "too-large"],
)
def test_encoding_rejects_what_it_cannot_sum_exactly(values: NDArray[np.float64]) -> None:
    with pytest.raises(ReplyRejected):
        encode(values)


def test_field_sums_wrap_exactly_and_negatives_cancel() -> None:
    a, b = encode(np.array([1.25, -3.0, 0.0])), encode(np.array([-1.25, 5.5, -2.0]))

    np.testing.assert_allclose(decode(add(a, b)), [0.0, 2.5, -2.0])
    np.testing.assert_allclose(decode(subtract(a, b)), [2.5, -8.5, 2.0])


def test_lazy_reduction_matches_python_integers_over_many_additions() -> None:
    rng = np.random.default_rng(0)
    values = [rng.integers(0, FIELD, size=50, dtype=np.uint64, endpoint=True) for _ in range(20)]  # FIELD is 0 too
    running = FieldSum(values[0])
    for v in values[1:10]:
        running.add(v)
    for v in values[10:]:
        running.subtract(v)

    want = [(sum(int(v[i]) for v in values[:10]) - sum(int(v[i]) for v in values[10:])) % FIELD for i in range(50)]
    assert running.result().tolist() == want


def test_prg_is_deterministic_per_seed_and_stays_in_the_field() -> None:
    first, again, other = prg(bytes(32), 1000), prg(bytes(32), 1000), prg(bytes([1]) * 32, 1000)

    np.testing.assert_array_equal(first, again)
    assert np.mean(first == other) < 0.01 and bool((first <= FIELD).all())
    assert abs(float(np.mean(first)) / FIELD - 0.5) < 0.05  # about uniform


def test_clip_scales_long_vectors_down_and_leaves_short_ones() -> None:
    long, short = np.array([3.0, 4.0]), np.array([0.3, 0.4])

    np.testing.assert_allclose(clip(long, 1.0), [0.6, 0.8])
    np.testing.assert_array_equal(clip(short, 1.0), short)


# --- the graph and threshold ------------------------------------------------------------------------


def test_neighbourhoods_are_symmetric_of_the_configured_size_and_reshuffled_per_round() -> None:
    members = [f"site-{i:03d}" for i in range(40)]

    plan = plan_round(members, JOB, 1, 9, None)
    later = plan_round(members, JOB, 2, 9, None)

    assert all(len(n) == 9 and s in n for s, n in plan.neighbourhoods.items())
    assert all(u in plan.neighbourhoods[v] for u, near in plan.neighbourhoods.items() for v in near)
    assert plan.threshold == 5 and plan.num_shares == 9
    assert plan.neighbourhoods != later.neighbourhoods


@pytest.mark.parametrize(("sites", "expected"), [(2, 2), (4, 4), (8, 7), (100, 15), (1000, 21)])
def test_default_neighbourhood_grows_with_log_n_not_n(sites: int, expected: int) -> None:
    assert default_num_shares(sites) == expected


@pytest.mark.parametrize(
    ("threshold", "expected"), [(None, 4), (0.6, 5), (6, 6), (1.0, 7)], ids=["majority", "fraction", "int", "all"]
)
def test_threshold_is_at_least_a_strict_majority(threshold: int | float | None, expected: int) -> None:
    assert threshold_for(7, threshold) == expected


@pytest.mark.parametrize("threshold", [3, 8], ids=["minority", "more-than-shares"])
def test_a_threshold_outside_majority_to_all_is_refused(threshold: int) -> None:
    with pytest.raises(ReplyRejected, match="strict majority"):
        threshold_for(7, threshold)


# --- whole rounds -----------------------------------------------------------------------------------


def test_secure_sum_equals_plain_fedavg() -> None:
    updates = make_updates()
    vectors, weights = vectors_and_weights()
    shapes = [w.shape for w in updates["alpha"][0]]

    secure = unflatten(run_round(vectors, weights), shapes)

    for got, want in zip(secure, fedavg(list(updates.values())), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_single_masked_update_reveals_nothing_useful() -> None:
    vectors, weights = vectors_and_weights()
    rnd = Round({s: fixed_site(s) for s in SITE_IDS})
    rnd.advertise()
    rnd.share()
    rnd.mask(vectors, weights)
    truth = vectors["bravo"] * weights["bravo"]

    seen = decode(rnd.masked["bravo"])[:-1]

    assert abs(np.corrcoef(seen, truth)[0, 1]) < 0.5
    assert np.linalg.norm(seen - truth) > 1e6 * np.linalg.norm(truth)


def test_without_unmasking_the_sum_is_garbage() -> None:
    vectors, weights = vectors_and_weights()
    rnd = Round({s: fixed_site(s) for s in SITE_IDS})
    rnd.advertise()
    rnd.share()
    rnd.mask(vectors, weights)
    total = FieldSum(np.zeros(vectors["alpha"].size + 1, dtype=np.uint64))
    for vector in rnd.masked.values():
        total.add(vector)

    dangling = decode(total.result())

    assert abs(dangling[-1] - sum(weights.values())) > 1e6  # the self-masks stay until their seeds are rebuilt


@pytest.mark.parametrize(
    ("other_round", "other_job"),
    [(4, JOB), (3, "job-0002")],  # the next round of the same job; the same round of another job
    ids=["other-round", "other-job"],
)
def test_masks_differ_across_rounds_and_jobs(other_round: int, other_job: str) -> None:
    vectors, weights = vectors_and_weights()

    def masked(server_round: int, job_id: str) -> NDArray[np.uint64]:
        sites = {s: fixed_site(s, job_id) for s in SITE_IDS}
        keys = {s: site.round_keys(server_round) for s, site in sites.items()}
        plan = plan_round(keys, job_id, server_round, None, None)
        return sites["delta"].mask(vectors["delta"], weights["delta"], server_round, keys, plan)

    first, again, other = masked(3, JOB), masked(3, JOB), masked(other_round, other_job)

    np.testing.assert_array_equal(first, again)  # deterministic given the site's secret, round and job
    assert np.mean(first == other) < 0.01


def test_round_keys_are_fresh_each_round() -> None:
    site = fixed_site("alpha")

    assert site.round_keys(1) != site.round_keys(2) and len(site.round_keys(1)) == 64


def test_mask_does_not_mutate_its_input() -> None:
    vectors, weights = vectors_and_weights()
    saved = vectors["echo"].copy()

    run_round(vectors, weights)

    np.testing.assert_array_equal(vectors["echo"], saved)


def test_generated_secrets_work_like_fixed_ones() -> None:
    from quorum.tasks.secagg_protocol import SecAggSite

    rnd = Round({s: SecAggSite.generate(s, JOB) for s in ("x", "y", "z")})
    vectors = {"x": np.array([1.0, 2.0]), "y": np.array([3.0, -1.0]), "z": np.array([0.5, 0.5])}
    weights = {"x": 1, "y": 1, "z": 2}
    rnd.advertise()
    rnd.share()
    rnd.mask(vectors, weights)

    total = rnd.total(rnd.reveal(["x", "y", "z"], dropped=[]))

    np.testing.assert_allclose(total, [5.0, 2.0, 4.0], atol=1e-6)


def test_a_sparse_graph_round_equals_fedavg_at_30_sites() -> None:
    rng = np.random.default_rng(3)
    ids = [f"s{i:02d}" for i in range(30)]
    vectors = {s: rng.normal(size=20) for s in ids}
    weights = {s: int(rng.integers(1, 100)) for s in ids}

    got = run_round(vectors, weights, num_shares=7, gone_after_share=["s03", "s17"], gone_after_mask=["s21"])

    survivors = [s for s in ids if s not in ("s03", "s17")]
    np.testing.assert_allclose(got, plain_mean(vectors, weights, survivors), atol=1e-6)


def test_checked_mean_accepts_an_honest_sum_at_its_exact_bound() -> None:
    total = np.array([3.0 * 10, 4.0 * 10, 10.0])  # one site, weight 10, delta (3, 4) of norm 5 = clip_norm

    np.testing.assert_allclose(checked_mean_delta(total, 10.0, 5.0, 1), [3.0, 4.0])
