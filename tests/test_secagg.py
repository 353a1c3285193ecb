"""Secure aggregation: masks cancel in the sum, hide each update, survive a dropout, and differ per round."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected
from quorum.tasks.aggregate import fedavg
from quorum.tasks.secagg import (
    SecAggSite,
    decode,
    encode,
    fedavg_from_sum,
    flatten,
    secure_sum,
    unflatten,
    unmask_dropouts,
)

JOB = "job-0001"
SITE_IDS = ("alpha", "bravo", "charlie", "delta", "echo")


def fixed_key(site_id: str) -> X25519PrivateKey:
    """Fixed keys derived from the site id, so the tests run offline and reproducibly."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(f"quorum-test-{site_id}".encode()).digest())


def make_sites() -> dict[str, SecAggSite]:
    return {site_id: SecAggSite(site_id, fixed_key(site_id)) for site_id in SITE_IDS}


def make_updates() -> dict[str, tuple[list[NDArray[np.float32]], int]]:
    rng = np.random.default_rng(5)
    return {
        site_id: (
            [rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)],
            int(rng.integers(50, 500)),
        )
        for site_id in SITE_IDS
    }


def public_keys(sites: dict[str, SecAggSite]) -> dict[str, bytes]:
    return {site_id: site.public_key_bytes() for site_id, site in sites.items()}


def test_flatten_and_unflatten_round_trip() -> None:
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7.5], dtype=np.float32)]

    back = unflatten(flatten(weights), [w.shape for w in weights])

    for got, want in zip(back, weights, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.float32


def test_fixed_point_encoding_round_trips_within_its_resolution() -> None:
    values = np.array([0.0, -1.5, 3.14159, -1e6, 2.0**-20], dtype=np.float64)

    np.testing.assert_allclose(decode(encode(values)), values, atol=2.0**-17)


@pytest.mark.parametrize(
    "values",
    [
        np.array([np.nan]),  # diverged training
        np.array([2.0**31]),  # beyond the fixed-point range: the sum could wrap
    ],
    ids=["nan", "too-large"],
)
def test_encoding_rejects_what_it_cannot_sum_exactly(values: NDArray[np.float64]) -> None:
    with pytest.raises(ReplyRejected):
        encode(values)


def test_secure_sum_equals_plain_fedavg() -> None:
    sites, updates = make_sites(), make_updates()
    keys = public_keys(sites)
    shapes = [w.shape for w in updates["alpha"][0]]

    masked = {
        site_id: site.mask(flatten(updates[site_id][0]), updates[site_id][1], keys, server_round=3, job_id=JOB)
        for site_id, site in sites.items()
    }
    secure = fedavg_from_sum(secure_sum(masked, participants=keys, revealed={}), shapes)

    for got, want in zip(secure, fedavg(list(updates.values())), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_single_masked_update_reveals_nothing_useful() -> None:
    sites, updates = make_sites(), make_updates()
    keys = public_keys(sites)
    truth = flatten(updates["bravo"][0]) * updates["bravo"][1]

    seen = decode(sites["bravo"].mask(flatten(updates["bravo"][0]), updates["bravo"][1], keys, 3, JOB))[:-1]

    assert abs(np.corrcoef(seen, truth)[0, 1]) < 0.5
    assert np.linalg.norm(seen - truth) > 1e6 * np.linalg.norm(truth)


def test_dropout_after_masking_still_yields_the_survivors_sum() -> None:
    sites, updates = make_sites(), make_updates()
    keys = public_keys(sites)
    shapes = [w.shape for w in updates["alpha"][0]]
    masked = {s: site.mask(flatten(updates[s][0]), updates[s][1], keys, 7, JOB) for s, site in sites.items()}
    del masked["charlie"]  # charlie masked with everyone's keys, then never sent
    survivors = sorted(masked)

    revealed = {s: sites[s].reveal_pair_seeds(["charlie"], keys, 7, JOB) for s in survivors}
    secure = fedavg_from_sum(secure_sum(masked, participants=keys, revealed=revealed), shapes)

    expected = fedavg([updates[s] for s in survivors])
    for got, want in zip(secure, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_dropout_without_every_reveal_is_refused() -> None:
    sites, updates = make_sites(), make_updates()
    keys = public_keys(sites)
    masked = {s: site.mask(flatten(updates[s][0]), updates[s][1], keys, 7, JOB) for s, site in sites.items()}
    del masked["charlie"]
    revealed = {s: sites[s].reveal_pair_seeds(["charlie"], keys, 7, JOB) for s in ("alpha", "bravo", "delta")}

    with pytest.raises(ReplyRejected, match="echo<->charlie"):
        secure_sum(masked, participants=keys, revealed=revealed)


def test_without_unmasking_a_dropout_the_sum_is_garbage() -> None:
    sites, updates = make_sites(), make_updates()
    keys = public_keys(sites)
    masked = {s: site.mask(flatten(updates[s][0]), updates[s][1], keys, 7, JOB) for s, site in sites.items()}
    del masked["charlie"]
    total = np.zeros_like(masked["alpha"])
    for vector in masked.values():
        total += vector

    dangling = decode(total)
    cleaned = decode(
        unmask_dropouts(
            total,
            survivors=masked,
            dropped=["charlie"],
            revealed={s: sites[s].reveal_pair_seeds(["charlie"], keys, 7, JOB) for s in masked},
        )
    )

    true_weight = sum(updates[s][1] for s in masked)
    assert abs(dangling[-1] - true_weight) > 1e6
    assert cleaned[-1] == pytest.approx(true_weight)


@pytest.mark.parametrize(
    ("other_round", "other_job"),
    [(4, JOB), (3, "job-0002")],  # the next round of the same job; the same round of another job
    ids=["other-round", "other-job"],
)
def test_masks_differ_across_rounds_and_jobs(other_round: int, other_job: str) -> None:
    sites, updates = make_sites(), make_updates()
    keys = public_keys(sites)
    vector, weight = flatten(updates["delta"][0]), updates["delta"][1]

    first = sites["delta"].mask(vector, weight, keys, 3, JOB)
    again = sites["delta"].mask(vector, weight, keys, 3, JOB)
    other = sites["delta"].mask(vector, weight, keys, other_round, other_job)

    np.testing.assert_array_equal(first, again)  # deterministic given the keys, round and job
    assert np.mean(first == other) < 0.01


def test_mask_does_not_mutate_its_input() -> None:
    sites, updates = make_sites(), make_updates()
    vector = flatten(updates["echo"][0])
    saved = vector.copy()

    sites["echo"].mask(vector, 10, public_keys(sites), 1, JOB)

    np.testing.assert_array_equal(vector, saved)


def test_generated_keys_work_like_fixed_ones() -> None:
    sites = {s: SecAggSite.generate(s) for s in ("x", "y", "z")}
    keys = public_keys(sites)
    vectors = {"x": np.array([1.0, 2.0]), "y": np.array([3.0, -1.0]), "z": np.array([0.5, 0.5])}

    masked = {s: sites[s].mask(vectors[s], 1.0, keys, 1, JOB) for s in sites}
    total = secure_sum(masked, participants=keys, revealed={})

    np.testing.assert_allclose(total, [4.5, 1.5, 3.0], atol=1e-4)
