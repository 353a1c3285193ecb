"""Secure aggregation at the site's files and in the coordinator's round steps (``flows.rounds``).

The sites here keep their secrets in their own folders (``tasks.site_secagg``) and mask fixed updates,
so the coordinator's steps (setup, unmasking, checks) are tested without training or Prefect.
"""

from __future__ import annotations

import stat
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quorum.configs.errors import NotEnoughSites, ReplyRejected
from quorum.configs.schema import FederationConfig
from quorum.evaluation.report import SiteEvaluation
from quorum.flows import rounds
from quorum.flows.runners.local import SecAggRound, SiteFailure, SiteRunner
from quorum.tasks import site_secagg
from quorum.tasks.aggregate import fedavg
from quorum.tasks.model import Weights
from quorum.tasks.secagg import clip, flatten
from quorum.tasks.site_secagg import MaskedUpdate, reveal_shares, round_file, round_keys, share_keys, site_key
from quorum.tasks.wire import Request, decode_request, encode_request

JOB = "job-7"
ROUND = 3
SITES = ("a", "b", "c", "d", "e")


def federation(tmp_path: Path, min_sites: int = 2, **secagg: Any) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "secagg",
            "model_name": "secagg-model",
            "features": {"numeric": ["x0", "x1"]},
            "sites": {s: {"root": str(tmp_path / s)} for s in SITES},
            "model": {"hidden_sizes": [4]},
            "training": {"min_sites": min_sites, "secure_aggregation": True, "secagg": secagg},
        }
    )


class FixedUpdates(SiteRunner):
    """Sites that mask fixed updates with their real secrets. ``unshared`` advertise keys but never share,
    ``silent`` share but never send, ``mute`` send but never unmask; ``lie`` maps a site to the example
    count it claims in the clear while masking ``boost`` times its fingerprint weight."""

    def __init__(
        self,
        config: FederationConfig,
        updates: dict[str, tuple[Weights, int]],
        *,
        unshared: Collection[str] = (),
        silent: Collection[str] = (),
        mute: Collection[str] = (),
        lie: dict[str, int] | None = None,
        boost: float = 1.0,
    ) -> None:
        self.config, self.updates = config, updates
        self.unshared, self.silent, self.mute, self.lie, self.boost = (
            set(unshared),
            set(silent),
            set(mute),
            lie or {},
            boost,
        )
        self.reveals: list[tuple[str, ...]] = []

    def keys(self, site_ids: Sequence[str], job_id: str, server_round: int) -> dict[str, bytes | SiteFailure]:
        return {s: round_keys(self.config, s, job_id, server_round) for s in site_ids}

    def share(self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int) -> dict[str, Any]:
        return {
            s: _gone(s) if s in self.unshared else share_keys(self.config, s, secagg.job_id, server_round, secagg.peers)
            for s in site_ids
        }

    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Any]:
        assert secagg is not None
        out: dict[str, Any] = {}
        for s in site_ids:
            if s in self.silent:
                out[s] = _gone(s)
                continue
            trained, n = self.updates[s]
            site = site_key(self.config, s, secagg.job_id, server_round)
            plan = site_secagg.round_plan(self.config, secagg.job_id, server_round, secagg.peers)
            delta = clip(flatten(trained) - flatten(weights), self.config.training.secagg.clip_norm)
            weight = n * (self.boost if s in self.lie else 1.0)
            masked = site.mask(delta, weight, server_round, secagg.peers, plan, secagg.unshared)
            out[s] = MaskedUpdate(s, server_round, masked, self.lie.get(s, n), 0.1)
        return out

    def reveal(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Collection[str]
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        self.reveals.append(tuple(sorted(dropped)))
        return {
            s: _gone(s)
            if s in self.mute
            else reveal_shares(
                self.config, s, secagg.job_id, server_round, secagg.peers, dropped, secagg.shares.get(s, {})
            )
            for s in site_ids
        }

    def preprocess(self, site_ids: Sequence[str]) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, SiteEvaluation | SiteFailure]:
        raise NotImplementedError

    def compare_variants(self, site_ids: Sequence[str], weights: Weights, variants: Any) -> dict[str, Any]:
        raise NotImplementedError

    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]:
        raise NotImplementedError


def _gone(site_id: str) -> SiteFailure:
    return SiteFailure(site_id, "Site did not answer", f"site {site_id} did not answer within 1s", "")


def five_updates() -> tuple[Weights, dict[str, tuple[Weights, int]]]:
    rng = np.random.default_rng(9)
    reference = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)]
    updates = {
        s: ([w + rng.normal(scale=0.1, size=w.shape).astype(np.float32) for w in reference], int(rng.integers(50, 500)))
        for s in SITES
    }
    return reference, updates


def fedavg_of(updates: dict[str, tuple[Weights, int]], sites: Collection[str]) -> Weights:
    return fedavg([updates[s] for s in sorted(sites)])


def secure_round(runner: FixedUpdates, reference: Weights) -> tuple[Weights, dict[str, str], dict[str, str]]:
    """The round loop's secure-aggregation steps, as ``flows.tuning`` calls them; rows are the fingerprints'."""
    training = runner.config.training
    secagg, left_out = rounds.secure_setup(runner, JOB, SITES, ROUND, training)
    replies = runner.train([s for s in SITES if s not in left_out], reference, ROUND, secagg)
    accepted = {s: r for s, r in replies.items() if isinstance(r, MaskedUpdate)}
    rows = {s: n for s, (_, n) in runner.updates.items()}
    weights, extra, silent = rounds.aggregate_secure(runner, secagg, ROUND, reference, accepted, training, rows)  # type: ignore[arg-type]
    return weights, {**left_out, **extra}, silent


def assert_close(got: Weights, want: Weights) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


# --- the coordinator's steps ------------------------------------------------------------------------


def test_every_site_in_the_sum_gives_fedavg(tmp_path: Path) -> None:
    reference, updates = five_updates()
    runner = FixedUpdates(federation(tmp_path), updates)

    weights, rejected, silent = secure_round(runner, reference)

    assert rejected == {} and silent == {} and runner.reveals == [()]
    assert_close(weights, fedavg_of(updates, SITES))


@pytest.mark.parametrize(
    ("dropout", "in_sum"),
    [
        ({"unshared": {"c"}}, False),  # advertised, then gone before sharing
        ({"silent": {"c"}}, False),  # shared, then gone before sending its masked update
        ({"mute": {"c"}}, True),  # sent its masked update, then gone before unmasking
    ],
    ids=["after-advertise", "after-share", "after-masked-input"],
)
def test_a_dropout_at_each_step_still_yields_fedavg_of_the_sum(
    tmp_path: Path, dropout: dict[str, set[str]], in_sum: bool
) -> None:
    reference, updates = five_updates()
    runner = FixedUpdates(federation(tmp_path), updates, **dropout)  # type: ignore[arg-type]

    weights, rejected, silent = secure_round(runner, reference)

    expected = set(SITES) if in_sum else set(SITES) - {"c"}
    assert_close(weights, fedavg_of(updates, expected))
    assert len(runner.reveals) == 1  # one unmasking request: shares from any threshold of sites suffice
    assert ("c" in silent) == in_sum and ("c" in rejected) == ("unshared" in dropout)


def test_dropouts_at_two_steps_at_once_within_the_tolerance(tmp_path: Path) -> None:
    reference, updates = five_updates()
    runner = FixedUpdates(federation(tmp_path), updates, silent={"b"}, mute={"e"})  # 5 sites, threshold 3

    weights, _, silent = secure_round(runner, reference)

    assert runner.reveals == [("b",)] and list(silent) == ["e"]
    assert_close(weights, fedavg_of(updates, {"a", "c", "d", "e"}))


def test_too_few_survivors_stop_the_round(tmp_path: Path) -> None:
    reference, updates = five_updates()
    runner = FixedUpdates(federation(tmp_path, min_sites=3), updates, silent={"a", "b", "c"})

    with pytest.raises(NotEnoughSites, match="2 valid replies, 3 needed"):
        secure_round(runner, reference)


def test_fewer_survivors_than_the_threshold_stop_the_round(tmp_path: Path) -> None:
    reference, updates = five_updates()
    runner = FixedUpdates(federation(tmp_path, threshold=4), updates, silent={"a", "b"})

    with pytest.raises(NotEnoughSites, match="secure-aggregation threshold is 4"):
        secure_round(runner, reference)


def test_a_reply_claiming_1_example_is_left_out_and_the_rest_aggregate_honestly(tmp_path: Path) -> None:
    """The attack: 1 example in the clear, 100000x its weight in the mask. Weights come from fingerprints."""
    reference, updates = five_updates()
    runner = FixedUpdates(federation(tmp_path), updates, lie={"e": 1}, boost=100_000 / updates["e"][1])

    weights, rejected, _ = secure_round(runner, reference)

    assert "claims 1 examples" in rejected["e"] and runner.reveals == [("e",)]
    assert_close(weights, fedavg_of(updates, {"a", "b", "c", "d"}))


def test_a_site_masking_a_larger_weight_than_its_fingerprint_has_the_round_refused(tmp_path: Path) -> None:
    reference, updates = five_updates()
    honest_count = updates["e"][1]
    runner = FixedUpdates(federation(tmp_path), updates, lie={"e": honest_count}, boost=1000.0)

    with pytest.raises(ReplyRejected, match="masked another example count"):
        secure_round(runner, reference)


# --- the site's files ----------------------------------------------------------------------------------


def test_each_keys_request_starts_an_attempt_with_a_fresh_private_secret(tmp_path: Path) -> None:
    config = federation(tmp_path)

    first = round_keys(config, "a", "job-1", 1)
    retry = round_keys(config, "a", "job-1", 1)  # the round asked again: new secrets, never the old masks
    path = round_file(config.site("a"), "job-1", 1, "key")

    assert len({first, retry}) == 2 and len(first) == 64
    assert path.is_relative_to(config.site("a").root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes() not in first  # the file holds the secret, which no public key shows


def test_a_request_with_a_previous_attempts_keys_is_refused(tmp_path: Path) -> None:
    config = federation(tmp_path)
    stale = {s: round_keys(config, s, JOB, ROUND) for s in SITES}
    round_keys(config, "a", JOB, ROUND)  # a new attempt at the round

    with pytest.raises(ReplyRejected, match="does not hold site a's keys for round 3"):
        share_keys(config, "a", JOB, ROUND, stale)


def test_a_site_sends_one_masked_vector_per_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two vectors under the same masks would reveal their difference: the second is refused."""
    from quorum.tasks import site as site_work

    config = federation(tmp_path)
    reference, updates = five_updates()
    trained = {"weights": updates["a"][0]}
    monkeypatch.setattr(
        site_work, "train_site", lambda c, s, w, r: site_work.SiteUpdate(s, r, trained["weights"], 100, 0.1)
    )
    peers = {s: round_keys(config, s, JOB, ROUND) for s in SITES}

    first = site_secagg.train_site_masked(config, "a", reference, ROUND, JOB, peers)
    again = site_secagg.train_site_masked(config, "a", reference, ROUND, JOB, peers)  # a retried request
    trained["weights"] = updates["b"][0]  # e.g. the coordinator sent other global weights for the round
    with pytest.raises(ReplyRejected, match="already sent another masked update"):
        site_secagg.train_site_masked(config, "a", reference, ROUND, JOB, peers)

    np.testing.assert_array_equal(first.masked, again.masked)
    peers = {**peers, "a": round_keys(config, "a", JOB, ROUND)}  # a new attempt: fresh masks, so it may send
    assert site_secagg.train_site_masked(config, "a", reference, ROUND, JOB, peers).masked.size == first.masked.size


def _shared_round(config: FederationConfig) -> tuple[dict[str, bytes], dict[str, dict[str, bytes]]]:
    peers = {s: round_keys(config, s, JOB, ROUND) for s in SITES}
    inbox: dict[str, dict[str, bytes]] = {}
    for sender in SITES:
        for recipient, ciphertext in share_keys(config, sender, JOB, ROUND, peers).items():
            inbox.setdefault(recipient, {})[sender] = ciphertext
    return peers, inbox


def test_a_site_never_reveals_the_other_kind_of_share_later_in_the_round(tmp_path: Path) -> None:
    """Its record of what it revealed is on disk: a new process (a restarted session) refuses the same."""
    config = federation(tmp_path)
    peers, inbox = _shared_round(config)
    reveal_shares(config, "a", JOB, ROUND, peers, ["b"], inbox["a"])  # b called dropped: b's mask-key share
    record = round_file(config.site("a"), JOB, ROUND, "reveal.json")

    with pytest.raises(ReplyRejected, match="never reveals both kinds"):
        reveal_shares(config, "a", JOB, ROUND, peers, [], inbox["a"])  # now b is alive: its self-mask share

    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert reveal_shares(config, "a", JOB, ROUND + 1, *_next_round(config, "a"))  # a new round starts afresh


def _next_round(config: FederationConfig, site_id: str) -> tuple[dict[str, bytes], list[str], dict[str, bytes]]:
    peers = {s: round_keys(config, s, JOB, ROUND + 1) for s in SITES}
    inbox = {s: share_keys(config, s, JOB, ROUND + 1, peers)[site_id] for s in SITES}
    return peers, [], inbox


def test_a_site_refuses_to_unmask_when_fewer_than_the_threshold_survive(tmp_path: Path) -> None:
    config = federation(tmp_path)
    peers, inbox = _shared_round(config)

    with pytest.raises(ReplyRejected, match="only 2 sites survive round 3, 3 needed"):
        reveal_shares(config, "a", JOB, ROUND, peers, ["c", "d", "e"], inbox["a"])


def test_a_site_refuses_a_tampered_share(tmp_path: Path) -> None:
    config = federation(tmp_path)
    peers, inbox = _shared_round(config)
    tampered = {**inbox["a"], "b": inbox["a"]["b"][:-1] + bytes([inbox["a"]["b"][-1] ^ 1])}

    with pytest.raises(ReplyRejected, match="do not decrypt"):
        reveal_shares(config, "a", JOB, ROUND, peers, [], tampered)


def test_a_site_refuses_a_key_list_without_its_own_keys(tmp_path: Path) -> None:
    config = federation(tmp_path)
    peers = {s: round_keys(config, s, JOB, ROUND) for s in SITES}
    peers["a"] = round_keys(config, "b", JOB, ROUND)  # a key the coordinator swapped in

    with pytest.raises(ReplyRejected, match="does not hold site a's keys"):
        site_secagg.train_site_masked(config, "a", [], ROUND, JOB, peers)


def test_request_carries_round_keys_dropped_sites_and_shares_over_the_wire() -> None:
    keys = {"alpha": bytes(range(64)), "beta": bytes(64)}
    shares = {"alpha": {"beta": "00ff"}}
    request = Request(
        "job", 4, "reveal", ("alpha",), 2, peers={s: k.hex() for s, k in keys.items()}, dropped=("beta",), shares=shares
    )

    back = decode_request(encode_request(request))

    assert back == request and back.peer_keys() == keys and back.shares_for("alpha") == {"beta": b"\x00\xff"}


def test_malformed_shares_on_the_wire_are_refused() -> None:
    with pytest.raises(ReplyRejected, match="malformed shares"):
        Request("job", 1, "reveal", ("alpha",), 1, shares={"alpha": {"beta": "zz"}}).shares_for("alpha")
