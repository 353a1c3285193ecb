"""The pieces the round loop is wired from: freezing, masks, private mean, masked replies, site keys,
the split cache, the wire format, and the coordinator's secure-aggregation steps with a dropout."""

from __future__ import annotations

import stat
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError, NotEnoughSites, ReplyRejected
from quorum.configs.schema import FederationConfig, TrainingConfig
from quorum.evaluation.report import SiteEvaluation
from quorum.flows import rounds
from quorum.flows.runners.local import SecAggRound, SiteFailure, SiteRunner
from quorum.tasks import site as site_work
from quorum.tasks.model import Weights, initial_weights
from quorum.tasks.privacy import private_mean
from quorum.tasks.replies import validate_masked_reply
from quorum.tasks.secagg import SecAggSite, flatten
from quorum.tasks.site_secagg import MaskedUpdate, key_path, public_key, reveal_seeds, train_site_masked
from quorum.tasks.strategies import keep_fixed, min_replies, trainable_tensors
from quorum.tasks.training import LocalTrainingConfig, freeze_leading_layers, train_local
from quorum.tasks.wire import Request, decode_request, encode_request

HIDDEN = (8, 4)


def site_data() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(200, 5)).astype(np.float32)
    return features, (features[:, 0] + features[:, 1] > 0).astype(np.float32)


def local(freeze_layers: int = 0) -> LocalTrainingConfig:
    return LocalTrainingConfig(HIDDEN, 0.0, 2, 32, 0.1, False, seed=5, freeze_layers=freeze_layers)


# --- fine-tuning: frozen layers ------------------------------------------------------------------


def test_frozen_layers_keep_their_weights_and_biases_bit_for_bit() -> None:
    features, labels = site_data()
    start = initial_weights(5, HIDDEN, np.zeros(5), np.ones(5), seed=0)

    trained = train_local(start, features, labels, local(freeze_layers=2)).weights

    for index in (0, 1, 2, 3, 4, 5):  # buffers, then the first two Linear layers' weight and bias
        np.testing.assert_array_equal(trained[index], start[index])
    assert not np.array_equal(trained[6], start[6])  # the head still learns


def test_freezing_nothing_is_the_default_behaviour() -> None:
    features, labels = site_data()
    start = initial_weights(5, HIDDEN, np.zeros(5), np.ones(5), seed=0)

    explicit = train_local(start, features, labels, local(freeze_layers=0))
    implicit = train_local(start, features, labels, LocalTrainingConfig(HIDDEN, 0.0, 2, 32, 0.1, False, seed=5))

    for got, want in zip(explicit.weights, implicit.weights, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "count",
    [
        -1,  # a negative count
        3,  # every Linear layer of a (8, 4) model: nothing left to train
    ],
    ids=["negative", "all"],
)
def test_freezing_must_leave_a_layer_to_train(count: int) -> None:
    with pytest.raises(ConfigError, match="freeze_layers"):
        local(freeze_layers=count)


def test_freeze_leading_layers_returns_only_what_still_trains() -> None:
    from quorum.tasks.model import build_model

    model = build_model(5, HIDDEN)

    trainable = freeze_leading_layers(model, 1)

    assert len(trainable) == 4  # two Linear layers left, a weight and a bias each
    assert all(p.requires_grad for p in trainable)


def test_trainable_tensors_skip_buffers_and_frozen_layers() -> None:
    assert trainable_tensors(8, 0) == [False, False, True, True, True, True, True, True]
    assert trainable_tensors(8, 2) == [False, False, False, False, False, False, True, True]
    with pytest.raises(ConfigError):
        trainable_tensors(8, 3)  # would freeze the output layer too


def test_keep_fixed_takes_untrained_tensors_from_the_reference() -> None:
    reference = [np.zeros(2, dtype=np.float32), np.ones(2, dtype=np.float32)]
    new = [np.full(2, 5, dtype=np.float32), np.full(2, 7, dtype=np.float32)]

    kept = keep_fixed(new, reference, [False, True])

    np.testing.assert_array_equal(kept[0], reference[0])
    np.testing.assert_array_equal(kept[1], new[1])
    assert kept[0] is not reference[0]  # a copy: the caller's list stays untouched


def test_min_replies_per_rule() -> None:
    assert min_replies("mean", 2, 1) == 1
    assert min_replies("krum", 1, 1) == 5  # n > 2f + 2
    assert min_replies("multi_krum", 1, 6) == 7  # m <= n - f


# --- differential privacy: the coordinator's mean ---------------------------------------------------


def test_private_mean_clips_each_site_and_leaves_untrained_tensors_alone() -> None:
    reference = [np.zeros(3, dtype=np.float32), np.zeros(4, dtype=np.float32)]
    far = [np.full(3, 9.0, dtype=np.float32), np.full(4, 100.0, dtype=np.float32)]
    near = [np.full(3, 9.0, dtype=np.float32), np.full(4, 0.1, dtype=np.float32)]
    quiet = np.random.default_rng(0)

    result = private_mean(reference, [far, near], [False, True], 1.0, 1e-9, quiet)

    np.testing.assert_array_equal(result[0], reference[0])  # not trained: not averaged, not noised
    # far is clipped to norm 1 (0.5 per coordinate), near is short enough to pass: mean of 0.5 and 0.1
    np.testing.assert_allclose(result[1], np.full(4, 0.3), atol=1e-6)


# --- secure aggregation: what the coordinator can check ----------------------------------------------


def masked_reply(**change: Any) -> MaskedUpdate:
    fields: dict[str, Any] = {
        "site_id": "alpha",
        "server_round": 2,
        "masked": np.zeros(7, dtype=np.uint64),
        "num_examples": 10,
        "train_loss": 0.5,
    }
    return MaskedUpdate(**{**fields, **change})


REFERENCE = [np.zeros((2, 3), dtype=np.float32)]  # 6 values + the summed weight = 7


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"site_id": "beta"}, "claims site"),  # a reply under another site's name
        ({"server_round": 1}, "for round 1"),  # a stale reply
        ({"num_examples": 0}, "example count 0"),  # trained on nothing
        ({"masked": np.zeros(6, dtype=np.uint64)}, "expected uint64[7]"),  # another model
        ({"masked": np.zeros(7, dtype=np.float64)}, "expected uint64[7]"),  # not a masked vector
    ],
    ids=["site", "round", "examples", "length", "dtype"],
)
def test_masked_reply_checks_what_it_can(change: dict[str, Any], fragment: str) -> None:
    problem = validate_masked_reply(masked_reply(**change), REFERENCE, 2, "alpha")

    assert problem is not None and fragment in problem


def test_a_well_formed_masked_reply_passes() -> None:
    assert validate_masked_reply(masked_reply(), REFERENCE, 2, "alpha") is None


# --- secure aggregation: the site's key ------------------------------------------------------------


def federation(tmp_path: Path, site_ids: Sequence[str] = ("alpha", "beta", "gamma")) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "parts",
            "model_name": "parts-model",
            "features": {"numeric": ["x0", "x1", "x2", "x3", "x4"]},
            "sites": {s: {"root": str(tmp_path / s)} for s in site_ids},
            "model": {"hidden_sizes": list(HIDDEN)},
            "training": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.1, "min_sites": 2},
        }
    )


def test_site_key_is_private_to_the_site_and_stable_for_the_job(tmp_path: Path) -> None:
    config = federation(tmp_path)

    first = public_key(config, "alpha", "job-1")
    again = public_key(config, "alpha", "job-1")
    other_job = public_key(config, "alpha", "job-2")
    path = key_path(config.site("alpha"), "job-1")

    assert first == again and first != other_job and len(first) == 32
    assert path.is_relative_to(config.site("alpha").root)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert first not in path.read_bytes()  # the file holds the private key, not the public one


@pytest.mark.parametrize("job_id", ["../escape", "a/b", "", ".hidden"], ids=["parent", "slash", "empty", "dot"])
def test_a_job_id_cannot_move_the_key_file(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(ReplyRejected, match="job id"):
        key_path(federation(tmp_path).site("alpha"), job_id)


def test_a_site_refuses_to_reveal_when_it_would_be_alone_in_the_sum(tmp_path: Path) -> None:
    config = federation(tmp_path)
    peers = {s: public_key(config, s, "job-1") for s in ("alpha", "beta")}

    with pytest.raises(ReplyRejected, match="alone in the sum"):
        reveal_seeds(config, "alpha", "job-1", 1, peers, ["beta"])


def test_a_site_refuses_a_key_list_without_its_own_key(tmp_path: Path) -> None:
    config = federation(tmp_path)
    peers = {"alpha": SecAggSite.generate("alpha").public_key_bytes(), "beta": public_key(config, "beta", "job-1")}

    with pytest.raises(ReplyRejected, match="does not hold site alpha's public key"):
        train_site_masked(config, "alpha", [], 1, "job-1", peers)


def test_request_carries_peer_keys_and_dropped_sites_over_the_wire() -> None:
    keys = {"alpha": bytes(range(32)), "beta": bytes(32)}
    request = Request("job", 4, "reveal", ("alpha",), 2, peers={s: k.hex() for s, k in keys.items()}, dropped=("beta",))

    back = decode_request(encode_request(request))

    assert back == request and back.peer_keys() == keys


def test_a_malformed_peer_key_is_rejected() -> None:
    with pytest.raises(ReplyRejected, match="not X25519 public keys"):
        Request("job", 1, "train", ("alpha",), 1, peers={"alpha": "abcd"}).peer_keys()


# --- the split cache -------------------------------------------------------------------------------


def test_split_is_read_once_and_reread_when_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = federation(tmp_path)
    site = config.site("alpha")
    site.processed_dir.mkdir(parents=True)
    path = site.processed_dir / site_work.TRAIN_FILE
    frame = pd.DataFrame({f"x{i}": [float(i), 1.0] for i in range(5)} | {"label": [0, 1], "group": ["a", "b"]})
    frame.to_parquet(path)
    reads: list[Path] = []
    real = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))

    first = site_work.load_split(config, site, "train")
    second = site_work.load_split(config, site, "train")
    frame.assign(x0=[7.0, 8.0, 9.0][:2]).to_parquet(path)  # preprocess ran again
    third = site_work.load_split(config, site, "train")

    assert len(reads) == 2 and second[0] is first[0]
    assert not first[0].flags.writeable  # shared across rounds, so nobody may change it
    np.testing.assert_array_equal(third[0][:, 0], [7.0, 8.0])


# --- the coordinator's secure aggregation, with a dropout ---------------------------------------------


class InMemorySecAgg(SiteRunner):
    """Sites that mask fixed updates: ``silent`` ones publish a key but never send; ``mute`` ones never reveal."""

    def __init__(self, updates: dict[str, tuple[Weights, int]], silent: Collection[str], mute: Collection[str]):
        self.sites = {s: SecAggSite.generate(s) for s in updates}
        self.updates, self.silent, self.mute = updates, set(silent), set(mute)
        self.reveals: list[tuple[str, ...]] = []

    def keys(self, site_ids: Sequence[str], job_id: str) -> dict[str, bytes | SiteFailure]:
        return {s: self.sites[s].public_key_bytes() for s in site_ids}

    def train(
        self, site_ids: Sequence[str], weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Any]:
        assert secagg is not None
        out: dict[str, Any] = {}
        for s in site_ids:
            if s in self.silent:
                out[s] = SiteFailure(s, "Site did not answer", f"site {s} did not answer within 1s", "")
                continue
            trained, n = self.updates[s]
            delta = flatten(trained) - flatten(weights)
            masked = self.sites[s].mask(delta, float(n), secagg.peers, server_round, secagg.job_id)
            out[s] = MaskedUpdate(s, server_round, masked, n, 0.1)
        return out

    def reveal(
        self, site_ids: Sequence[str], secagg: SecAggRound, server_round: int, dropped: Collection[str]
    ) -> dict[str, dict[str, bytes] | SiteFailure]:
        self.reveals.append(tuple(sorted(dropped)))
        return {
            s: SiteFailure(s, "gone", "stopped answering", "")
            if s in self.mute
            else self.sites[s].reveal_pair_seeds(dropped, secagg.peers, server_round, secagg.job_id)
            for s in site_ids
        }

    def preprocess(self, site_ids: Sequence[str]) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, site_ids: Sequence[str], weights: Weights) -> dict[str, SiteEvaluation | SiteFailure]:
        raise NotImplementedError

    def monitor(self, site_ids: Sequence[str], champion: Weights | None) -> dict[str, Any]:
        raise NotImplementedError


def five_updates() -> tuple[Weights, dict[str, tuple[Weights, int]]]:
    rng = np.random.default_rng(9)
    reference = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)]
    updates = {
        s: ([w + rng.normal(scale=0.1, size=w.shape).astype(np.float32) for w in reference], int(rng.integers(50, 500)))
        for s in ("a", "b", "c", "d", "e")
    }
    return reference, updates


def fedavg_of(updates: dict[str, tuple[Weights, int]], sites: Collection[str]) -> Weights:
    from quorum.tasks.aggregate import fedavg

    return fedavg([updates[s] for s in sorted(sites)])


def secure_round(runner: InMemorySecAgg, reference: Weights, min_sites: int = 2) -> tuple[Weights, dict[str, str]]:
    training = TrainingConfig(secure_aggregation=True, min_sites=min_sites)
    keys, _ = rounds.collect_keys(runner, sorted(runner.sites), "job-7")
    secagg = SecAggRound("job-7", keys)
    replies = runner.train(sorted(keys), reference, 3, secagg)
    accepted = {s: r for s, r in replies.items() if isinstance(r, MaskedUpdate)}
    return rounds.aggregate_secure(runner, secagg, 3, reference, accepted, training)  # type: ignore[arg-type]


def test_a_site_dropping_after_masking_is_unmasked_with_the_survivors_seeds() -> None:
    reference, updates = five_updates()
    runner = InMemorySecAgg(updates, silent={"c"}, mute=())

    weights, extra = secure_round(runner, reference)

    assert runner.reveals == [("c",)] and extra == {}
    for got, want in zip(weights, fedavg_of(updates, {"a", "b", "d", "e"}), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_survivor_that_does_not_reveal_is_dropped_too_and_the_others_asked_again() -> None:
    reference, updates = five_updates()
    runner = InMemorySecAgg(updates, silent={"c"}, mute={"e"})

    weights, extra = secure_round(runner, reference)

    assert runner.reveals == [("c",), ("c", "e")]
    assert set(extra) == {"e"} and "did not reveal" in extra["e"]
    for got, want in zip(weights, fedavg_of(updates, {"a", "b", "d"}), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_too_few_survivors_stop_the_round() -> None:
    reference, updates = five_updates()
    runner = InMemorySecAgg(updates, silent={"a", "b", "c"}, mute=())

    with pytest.raises(NotEnoughSites, match="2 valid replies, 3 needed"):
        secure_round(runner, reference, min_sites=3)
