"""Attacks on secure aggregation and dropouts at every step: each ends in a refusal or the honest aggregate.

A coordinator that lies about who dropped learns nothing about a live site; a site that inflates its
weight or its update, or sends a random vector, has its reply or the round refused.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from quorum.configs.errors import ReplyRejected
from quorum.tasks.replies import validate_masked_reply
from quorum.tasks.secagg import FIELD, FieldSum, agree, decode, pair_seed, pair_sign, prg, split_bundle
from quorum.tasks.secagg_protocol import checked_mean_delta
from quorum.tasks.shamir import Share, combine
from quorum.tasks.site_secagg import MaskedUpdate
from tests.secagg_harness import JOB, Round, fixed_site, plain_mean, run_round

SITE_IDS = ("alpha", "bravo", "charlie", "delta", "echo")
CLIP = 10.0


def inputs(size: int = 24) -> tuple[dict[str, NDArray[np.float64]], dict[str, int]]:
    rng = np.random.default_rng(11)
    vectors = {s: rng.normal(size=size) * 0.3 for s in SITE_IDS}  # norms about 1.5, inside CLIP
    return vectors, {s: int(rng.integers(50, 500)) for s in SITE_IDS}


def masked_round(vectors: dict[str, NDArray[np.float64]], weights: dict[str, int]) -> Round:
    rnd = Round({s: fixed_site(s) for s in SITE_IDS})
    rnd.advertise()
    rnd.share()
    rnd.mask(vectors, weights)
    return rnd


def rebuild(rnd: Round, revealed: dict[str, dict[str, bytes]], owner: str) -> bytes:
    """What a coordinator can rebuild from the shares it holds of ``owner`` (raises if too few)."""
    assert rnd.plan is not None
    shares = [Share.from_bytes(answer[owner]) for answer in revealed.values() if owner in answer]
    return combine(shares, rnd.plan.threshold)


def strip_pair_masks(rnd: Round, owner: str, mask_key: bytes) -> NDArray[np.float64]:
    """``owner``'s vector with every pair mask removed, as a coordinator holding its mask key could."""
    assert rnd.plan is not None
    private = X25519PrivateKey.from_private_bytes(mask_key)
    total = FieldSum(rnd.masked[owner])
    for peer in rnd.plan.neighbourhoods[owner]:
        if peer != owner:
            secret = agree(private, split_bundle(rnd.keys[peer])[1])
            seed = pair_seed(secret, owner, peer, rnd.server_round, JOB)
            (total.subtract if pair_sign(owner, peer) > 0 else total.add)(prg(seed, rnd.masked[owner].size))
    return decode(total.result())


# --- a coordinator that lies about dropouts -------------------------------------------------------------


def test_a_false_dropout_claim_yields_the_mask_key_but_the_self_mask_still_hides_the_site() -> None:
    vectors, weights = inputs()
    rnd = masked_round(vectors, weights)  # bravo's masked vector has arrived

    revealed = rnd.reveal([s for s in SITE_IDS if s != "bravo"], dropped=["bravo"])  # the lie
    seen = strip_pair_masks(rnd, "bravo", rebuild(rnd, revealed, "bravo"))[:-1] / weights["bravo"]

    assert abs(np.corrcoef(seen, vectors["bravo"])[0, 1]) < 0.5
    assert np.median(np.abs(seen - vectors["bravo"])) > 1e3  # noise of the self-mask, nothing like the update
    # the self-mask is all that stands between: with bravo's own seed too, the update would be in the clear
    self_mask = decode(prg(fixed_site("bravo")._self_seed(rnd.server_round), vectors["bravo"].size + 1))
    np.testing.assert_allclose(
        _unwrap(seen * weights["bravo"] - self_mask[:-1]) / weights["bravo"], vectors["bravo"], atol=1e-6
    )


def test_after_a_false_dropout_claim_no_site_reveals_the_self_mask_share_of_that_site() -> None:
    vectors, weights = inputs()
    rnd = masked_round(vectors, weights)
    rnd.reveal([s for s in SITE_IDS if s != "bravo"], dropped=["bravo"])

    for site_id in ("alpha", "charlie", "delta", "echo"):
        with pytest.raises(ReplyRejected, match="never reveals both kinds"):
            rnd.reveal([site_id], dropped=[])  # now the coordinator says bravo is alive after all


@pytest.mark.parametrize(
    "told_dropped", [c for r in range(5) for c in itertools.combinations(SITE_IDS[:1] + SITE_IDS[2:], r)]
)
def test_telling_sites_different_stories_never_yields_both_secrets_of_a_site(told_dropped: tuple[str, ...]) -> None:
    """Each of bravo's share holders hears either "bravo dropped" or "bravo lives": with a threshold above
    half the holders, the coordinator never holds enough of both kinds (bravo itself hears "alive")."""
    vectors, weights = inputs()
    rnd = masked_round(vectors, weights)

    revealed = {s: rnd.reveal([s], dropped=["bravo"] if s in told_dropped else [])[s] for s in SITE_IDS}
    pair_holders = {s: a for s, a in revealed.items() if s in told_dropped}
    self_holders = {s: a for s, a in revealed.items() if s not in told_dropped}

    rebuilt = 0
    for holders in (pair_holders, self_holders):
        try:
            rebuild(rnd, holders, "bravo")
            rebuilt += 1
        except ReplyRejected:
            pass
    assert rebuilt <= 1


# --- a site that lies about its weight or its update ---------------------------------------------------


def test_a_site_masking_a_weight_of_100000_has_the_round_refused() -> None:
    vectors, weights = inputs()
    claimed = {**weights, "echo": 100_000}  # masks [100000 * update, 100000]; its fingerprint says otherwise
    rnd = masked_round(vectors, claimed)
    total = rnd.total(rnd.reveal(SITE_IDS, dropped=[]))

    with pytest.raises(ReplyRejected, match="train rows: a site masked another example count"):
        checked_mean_delta(total, float(sum(weights.values())), CLIP, len(SITE_IDS))


def test_a_site_scaling_its_update_by_100000_has_the_round_refused() -> None:
    vectors, weights = inputs()
    boosted = {**vectors, "echo": vectors["echo"] * 100_000}  # the honest weight, an unclipped update
    rnd = masked_round(boosted, weights)
    total = rnd.total(rnd.reveal(SITE_IDS, dropped=[]))

    with pytest.raises(ReplyRejected, match="did not clip its update"):
        checked_mean_delta(total, float(sum(weights.values())), CLIP, len(SITE_IDS))


def test_honest_sites_pass_the_same_checks() -> None:
    vectors, weights = inputs()
    rnd = masked_round(vectors, weights)
    total = rnd.total(rnd.reveal(SITE_IDS, dropped=[]))

    mean = checked_mean_delta(total, float(sum(weights.values())), CLIP, len(SITE_IDS))

    np.testing.assert_allclose(mean, plain_mean(vectors, weights, SITE_IDS), atol=1e-6)


# --- a site that sends a random vector -------------------------------------------------------------------


def test_a_random_64_bit_vector_is_refused_on_arrival() -> None:
    noise = np.random.default_rng(0).integers(0, np.iinfo(np.uint64).max, size=25, dtype=np.uint64, endpoint=True)
    reply = MaskedUpdate("echo", 3, noise, 100, 0.5)

    problem = validate_masked_reply(reply, [np.zeros(24, dtype=np.float32)], 3, "echo")

    assert problem is not None and "outside the field" in problem


@pytest.mark.parametrize("kind", ["uniform", "zeros"], ids=["random-field-vector", "all-zero-vector"])
def test_a_well_formed_but_random_vector_has_the_round_refused(kind: str) -> None:
    vectors, weights = inputs()
    rnd = masked_round(vectors, weights)
    size = rnd.masked["echo"].size
    forged = prg(b"\x07" * 32, size) % np.uint64(FIELD) if kind == "uniform" else np.zeros(size, dtype=np.uint64)
    rnd.masked["echo"] = forged
    assert (
        validate_masked_reply(MaskedUpdate("echo", 3, forged, 100, 0.5), [np.zeros(24, np.float32)], 3, "echo") is None
    )

    total = rnd.total(rnd.reveal(SITE_IDS, dropped=[]))

    with pytest.raises(ReplyRejected, match="a site masked another example count|did not clip"):
        checked_mean_delta(total, float(sum(weights.values())), CLIP, len(SITE_IDS))


# --- dropout at every step ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "site_in_sum"),
    [
        ("gone_after_keys", False),  # advertised its keys, shared nothing: nobody masked with it
        ("gone_after_share", False),  # shared, sent no masked vector: its mask key is rebuilt
        ("gone_after_mask", True),  # sent its masked vector, never answered the unmasking
    ],
)
def test_a_dropout_after_each_step_still_yields_the_survivors_mean(step: str, site_in_sum: bool) -> None:
    vectors, weights = inputs()

    got = run_round(vectors, weights, clip_norm=CLIP, **{step: ["charlie"]})  # type: ignore[arg-type]

    survivors = [s for s in SITE_IDS if site_in_sum or s != "charlie"]
    np.testing.assert_allclose(got, plain_mean(vectors, weights, survivors), atol=1e-6)


def test_a_dropout_during_unmasking_keeps_the_site_in_the_sum() -> None:
    """Delta computes its answer (and records it) but the answer never arrives: the others' shares suffice."""
    vectors, weights = inputs()
    rnd = masked_round(vectors, weights)

    revealed = rnd.reveal(SITE_IDS, dropped=[])
    del revealed["delta"]
    total = rnd.total(revealed)

    mean = checked_mean_delta(total, float(sum(weights.values())), CLIP, len(SITE_IDS))
    np.testing.assert_allclose(mean, plain_mean(vectors, weights, SITE_IDS), atol=1e-6)


def test_asking_again_with_the_same_list_gets_the_same_answer() -> None:
    vectors, weights = inputs()
    rnd = masked_round(vectors, weights)

    first = rnd.reveal(["alpha"], dropped=["bravo"])
    again = rnd.reveal(["alpha"], dropped=["bravo"])

    assert first == again


def test_dropouts_at_every_step_in_one_round_up_to_n_minus_t() -> None:
    """7 sites, threshold 4: three may drop, one after each step."""
    rng = np.random.default_rng(4)
    ids = [f"s{i}" for i in range(7)]
    vectors = {s: rng.normal(size=10) for s in ids}
    weights = {s: int(rng.integers(1, 50)) for s in ids}

    got = run_round(
        vectors, weights, threshold=4, gone_after_keys=["s1"], gone_after_share=["s4"], gone_after_mask=["s6"]
    )

    np.testing.assert_allclose(got, plain_mean(vectors, weights, ["s0", "s2", "s3", "s5", "s6"]), atol=1e-6)


@pytest.mark.parametrize("threshold", [4, 5, 6, 7])
def test_dropout_tolerance_is_exactly_n_minus_t(threshold: int) -> None:
    rng = np.random.default_rng(6)
    ids = [f"s{i}" for i in range(7)]
    vectors = {s: rng.normal(size=10) for s in ids}
    weights = {s: 10 for s in ids}
    tolerated, one_more = ids[: 7 - threshold], ids[: 8 - threshold]

    got = run_round(vectors, weights, threshold=threshold, gone_after_share=tolerated)

    np.testing.assert_allclose(got, plain_mean(vectors, weights, [s for s in ids if s not in tolerated]), atol=1e-6)
    with pytest.raises(ReplyRejected, match="needed to unmask"):
        run_round(vectors, weights, threshold=threshold, gone_after_share=one_more)


def test_a_threshold_below_a_majority_is_refused_before_anything_is_shared() -> None:
    vectors, weights = inputs()

    with pytest.raises(ReplyRejected, match="strict majority"):
        run_round(vectors, weights, threshold=2)


def test_survivors_that_do_not_unmask_beyond_the_tolerance_void_the_round() -> None:
    vectors, weights = inputs()

    with pytest.raises(ReplyRejected, match="shares of site .* were revealed, 3 needed"):
        run_round(vectors, weights, gone_after_mask=["alpha", "bravo", "charlie"])


def _unwrap(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Decoded differences taken back into the field's signed range."""
    span = FIELD / 2**24
    return (values + span / 2) % span - span / 2
