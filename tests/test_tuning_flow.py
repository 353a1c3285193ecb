"""The round loop under each training option: a tiny federation (4 sites) trained in-process (LocalRunner)
under a temporary Prefect API, with MLflow and the artifact store in a temp dir.

Sites are preprocessed once per module; each test tunes from those processed folders with its own
``training:`` keys written into a federation.yaml of its own, so the schema is exercised as a user meets it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quorum.configs.errors import ConfigError, SiteDataError
from quorum.flows.context import JobContext, load_context
from quorum.flows.runners.local import LocalRunner, SecAggRound
from quorum.flows.tuning import OnRound, RoundDone, TuningResult, start_weights, tune_flow
from quorum.tasks import site as site_work
from quorum.tasks.privacy import epsilon_spent
from quorum.tasks.secagg import decode, flatten
from quorum.tasks.site import DataFingerprint, SiteUpdate
from quorum.tasks.site_secagg import MaskedUpdate
from quorum.tasks.strategies import sample_sites
from quorum.tasks.weights import Weights
from tests.federation import write_federation, write_governance

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SITES = ("alpha", "beta", "gamma", "delta")
SEED = 3  # tests/federation.py's seed


@dataclass(frozen=True)
class Federation:
    root: Path
    governance: Path
    fingerprints: dict[str, DataFingerprint]


@dataclass(frozen=True)
class Tuned:
    ctx: JobContext
    run_id: str
    result: TuningResult


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, prefect_harness: Path) -> Federation:
    from quorum.flows.preprocess import preprocess_flow

    root = tmp_path_factory.mktemp("tuning")
    config_path = write_federation(root, SITES)
    governance, _ = write_governance(root)
    ctx = load_context(str(config_path), str(governance), "preprocess")
    prep = preprocess_flow(ctx.config, LocalRunner(ctx.config))
    return Federation(root, governance, {s: prep.fingerprints[s] for s in prep.usable_sites})


@pytest.fixture
def flow_logs() -> Iterator[list[str]]:
    """The tune flow's log lines, as the Prefect UI and `quorum run` show them."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.INFO)
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def context(fed: Federation, job_id: str, rounds: int, training: dict[str, Any]) -> JobContext:
    path = write_federation(fed.root, SITES, rounds=rounds, training=training, name=f"{job_id}.yaml")
    return load_context(str(path), str(fed.governance), job_id)


def tune(
    fed: Federation,
    job_id: str,
    rounds: int = 2,
    runner: LocalRunner | None = None,
    on_round: OnRound | None = None,
    **training: Any,
) -> Tuned:
    ctx = context(fed, job_id, rounds, training)
    run_id = ctx.tracker.start_run("tune", tags={"quorum.job_id": job_id})
    result = tune_flow(ctx, runner or LocalRunner(ctx.config), fed.fingerprints, run_id, on_round=on_round)
    return Tuned(ctx, run_id, result)


def history(tuned: Tuned, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tuned.ctx.tracker.client.get_metric_history(tuned.run_id, key))


def manifest(tuned: Tuned, server_round: int) -> dict[str, Any]:
    data: Any = tuned.ctx.store.get_json(tuned.ctx.job_key("rounds", f"{server_round:04d}", "manifest.json"))
    return dict(data)


# --- strategies and rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "training",
    [
        {},
        {"strategy": "fedprox", "proximal_mu": 0.01},
        {"strategy": "fedavgm", "server_momentum": 0.5},
        {"strategy": "fedadam", "server_lr": 0.05},
        {"strategy": "fedyogi", "server_lr": 0.05},
        {"aggregation": "median"},
        {"aggregation": "trimmed_mean", "trim_fraction": 0.25},
        {"aggregation": "multi_krum", "multi_krum_m": 2},
    ],
    ids=["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "median", "trimmed-mean", "multi-krum"],
)
def test_each_strategy_runs_end_to_end_and_improves_over_round_1(
    federation: Federation, training: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    job = f"strategy-{request.node.callspec.id}"

    tuned = tune(federation, job, rounds=3, **training)

    records = tuned.result.rounds
    assert [r.server_round for r in records] == [1, 2, 3]
    assert all(r.sites == SITES_SORTED and not r.rejected for r in records)
    assert records[-1].metrics["auc"] > records[0].metrics["auc"]
    assert records[-1].train_loss < records[0].train_loss
    assert [step for step, _ in history(tuned, "auc")] == [1, 2, 3]
    assert {step for step, _ in history(tuned, "site.gamma.accuracy")} == {1, 2, 3}


SITES_SORTED = tuple(sorted(SITES))


# --- client sampling ---------------------------------------------------------------------------------


def test_half_the_sites_are_sampled_per_round_seeded_logged_and_repeatable(
    federation: Federation, flow_logs: list[str]
) -> None:
    first = tune(federation, "sample-1", sample_fraction=0.5)
    again = tune(federation, "sample-2", sample_fraction=0.5)

    sampled = [r.sampled for r in first.result.rounds]
    assert sampled == [r.sampled for r in again.result.rounds]
    assert sampled == [sample_sites(SITES, 0.5, 2, r, SEED) for r in (1, 2)]
    assert all(len(s) == 2 for s in sampled) and sampled[0] != sampled[1]  # a new draw each round
    assert [r.sites for r in first.result.rounds] == sampled
    assert [manifest(first, r)["sampled"] for r in (1, 2)] == [list(s) for s in sampled]
    assert history(first, "sampled_sites") == [(1, 2.0), (2, 2.0)]
    assert f"round 1: sampled {', '.join(sampled[0])} (sample_fraction 0.5, seed {SEED})" in flow_logs
    assert {step for step, _ in history(first, "site.alpha.auc")} == {1, 2}  # every site still evaluates


# --- garbage replies ------------------------------------------------------------------------------------


def nan_weights(update: SiteUpdate, start: Weights) -> SiteUpdate:
    weights = [w.copy() for w in update.weights]
    weights[-2][0, 0] = np.nan
    return SiteUpdate(update.site_id, update.server_round, weights, update.num_examples, update.train_loss)


def wrong_round(update: SiteUpdate, start: Weights) -> SiteUpdate:
    return SiteUpdate(update.site_id, update.server_round - 1, update.weights, update.num_examples, update.train_loss)


def scaled(update: SiteUpdate, start: Weights) -> SiteUpdate:
    weights = [s + 30.0 * (w - s) for w, s in zip(update.weights, start, strict=True)]
    return SiteUpdate(update.site_id, update.server_round, weights, update.num_examples, update.train_loss)


@pytest.mark.parametrize(
    ("garbage", "training", "reason"),
    [
        (nan_weights, {}, "holds NaN or Inf"),  # diverged local training
        (wrong_round, {}, "expected"),  # a stale or replayed reply
        (scaled, {"max_norm_ratio": 5}, "the median of the other sites"),  # a boosted update passes the shape checks
    ],
    ids=["nan", "wrong-round", "scaled"],
)
def test_a_garbage_reply_is_rejected_with_its_reason_and_the_round_goes_on(
    federation: Federation,
    monkeypatch: pytest.MonkeyPatch,
    flow_logs: list[str],
    garbage: Any,
    training: dict[str, Any],
    reason: str,
) -> None:
    honest = site_work.train_site

    def delta_sends_garbage(config: Any, site_id: str, weights: Weights, server_round: int) -> SiteUpdate:
        update = honest(config, site_id, weights, server_round)
        return garbage(update, weights) if site_id == "delta" else update

    monkeypatch.setattr(site_work, "train_site", delta_sends_garbage)
    progress: list[RoundDone] = []

    tuned = tune(federation, f"garbage-{garbage.__name__}", on_round=progress.append, **training)

    records = tuned.result.rounds
    assert len(records) == 2
    assert all(r.sites == ("alpha", "beta", "gamma") and list(r.rejected) == ["delta"] for r in records)
    assert all(reason in r.rejected["delta"] for r in records)
    assert history(tuned, "rejected_replies") == [(1, 1.0), (2, 1.0)]
    assert any(line.startswith("round 2: reply of delta rejected") and reason in line for line in flow_logs)
    artifact = tuned.ctx.tracker.client.download_artifacts(tuned.run_id, "rounds/0001/rejected.json")
    assert reason in json.loads(Path(artifact).read_text())["delta"]
    assert records[-1].metrics["auc"] > 0.7  # the model trained on the honest sites
    assert [(p.server_round, p.total_rounds, p.num_sites) for p in progress] == [(1, 2, 3), (2, 2, 3)]


# --- differential privacy -------------------------------------------------------------------------------


def test_dp_training_stops_before_the_budget_would_be_exceeded(federation: Federation, flow_logs: list[str]) -> None:
    noise, delta = 1.0, 1e-5
    # a budget that two rounds fit in and three do not (every site takes part: sampling rate 1)
    budget = (epsilon_spent(noise, 1.0, 2, delta) + epsilon_spent(noise, 1.0, 3, delta)) / 2
    privacy = {"enabled": True, "clip_norm": 2.0, "noise_multiplier": noise, "delta": delta, "epsilon_budget": budget}

    progress: list[RoundDone] = []

    tuned = tune(federation, "dp-budget", rounds=5, on_round=progress.append, privacy=privacy)

    result = tuned.result
    assert [r.server_round for r in result.rounds] == [1, 2]
    assert result.rounds[-1].epsilon == pytest.approx(epsilon_spent(noise, 1.0, 2, delta))
    assert [step for step, _ in history(tuned, "privacy.epsilon")] == [1, 2]
    assert manifest(tuned, 2)["epsilon"] == pytest.approx(result.rounds[-1].epsilon)
    tags = tuned.ctx.tracker.client.get_run(tuned.run_id).data.tags
    assert tags["privacy.budget_exhausted"] == "true" and tags["privacy.stopped_after_round"] == "2"
    assert "privacy budget: round 3 would bring epsilon" in result.stopped_early
    assert any("training stops after round 2" in line for line in flow_logs)
    # the progress callback saw each round that ran, out of the 5 configured, and nothing after the stop
    assert progress == [
        RoundDone(r.server_round, 5, 4, r.train_loss, r.metrics["accuracy"], r.metrics["auc"]) for r in result.rounds
    ]


# --- fine-tuning from a checkpoint ----------------------------------------------------------------------


def test_fine_tuning_from_a_checkpoint_keeps_the_frozen_layer_identical(federation: Federation) -> None:
    ctx = context(federation, "seed-model", 1, {})
    seed, _ = start_weights(ctx.config.model_copy(update={"seed": 99}), federation.fingerprints)
    checkpoint = federation.root / "seed.npz"
    np.savez(checkpoint, *seed)

    tuned = tune(federation, "fine-tune", start_from="checkpoint", checkpoint="seed.npz", freeze_layers=1)

    weights = tuned.result.weights
    for index in range(4):  # scaling buffers, then the first Linear layer's weight and bias
        np.testing.assert_array_equal(weights[index], seed[index])
    assert not np.array_equal(weights[4], seed[4])  # the output layer learnt
    assert tuned.result.feature_mean == seed[0].tolist()


def test_a_checkpoint_of_another_layout_is_a_config_error(federation: Federation) -> None:
    from quorum.flows.rounds import seed_weights

    np.savez(federation.root / "other.npz", np.zeros(3, dtype=np.float32))
    ctx = context(federation, "bad-seed", 1, {"start_from": "checkpoint", "checkpoint": "other.npz"})
    fresh, _ = start_weights(ctx.config, federation.fingerprints)

    with pytest.raises(ConfigError, match=r"checkpoint .*other.npz has tensor shapes \[\[3\]\]"):
        seed_weights(ctx, fresh)


# --- secure aggregation ----------------------------------------------------------------------------------


class Recording(LocalRunner):
    """The LocalRunner, keeping every train reply the coordinator received and the weights it sent."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.rounds: list[tuple[int, Weights, dict[str, Any]]] = []

    def train(
        self, site_ids: Any, weights: Weights, server_round: int, secagg: SecAggRound | None = None
    ) -> dict[str, Any]:
        replies = super().train(site_ids, weights, server_round, secagg)
        self.rounds.append((server_round, weights, replies))
        return replies


def test_secure_aggregation_gives_fedavgs_model_without_the_coordinator_seeing_an_update(
    federation: Federation,
) -> None:
    plain = tune(federation, "plain-fedavg")
    ctx = context(federation, "secure-fedavg", 2, {"secure_aggregation": True})
    runner = Recording(ctx.config)
    run_id = ctx.tracker.start_run("tune")

    secure = tune_flow(ctx, runner, federation.fingerprints, run_id)

    for got, want in zip(secure.weights, plain.result.weights, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [r.sites for r in secure.rounds] == [SITES_SORTED, SITES_SORTED]
    for server_round, sent, replies in runner.rounds:
        assert all(isinstance(reply, MaskedUpdate) for reply in replies.values())  # never a SiteUpdate
        for site_id, reply in replies.items():
            true = site_work.train_site(ctx.config, site_id, sent, server_round)  # what the site computed
            payload = flatten(true.weights) - flatten(sent)
            seen = decode(reply.masked)[:-1] / reply.num_examples
            assert np.median(np.abs(seen - payload)) > 1e6  # uniform noise, nothing like the update


def test_secure_aggregation_over_the_pool_exchange_survives_a_site_that_drops_after_masking(
    federation: Federation,
) -> None:
    """PoolRunner and the site sessions' ``handle``: delta advertises its keys and shares, then never sends."""
    from quorum.flows.runners.pool import PoolRunner
    from quorum.flows.runners.site_session import handle
    from quorum.tasks.aggregate import fedavg

    # delta's silence costs the deadline; the others, warmed up below and then trained one after the other,
    # must answer within it on a slow, busy machine
    deployment = {"round_deadline_s": 30.0, "session_start_timeout_s": 30.0}
    path = write_federation(
        federation.root,
        SITES,
        training={"secure_aggregation": True},
        extra={"deployment": deployment},
        name="pool-secagg.yaml",
    )
    ctx = load_context(str(path), str(federation.governance), "pool-secagg")
    runner = PoolRunner(ctx, str(path))
    stop = threading.Event()

    def sessions() -> None:
        done = 0
        while not stop.is_set():
            request = runner.exchange.latest()
            if request is None or request.seq <= done:
                time.sleep(0.01)
                continue
            for site_id in request.sites:
                if site_id != "delta" or request.kind in ("keys", "share"):
                    handle(ctx.config, site_id, runner.exchange, request)
            done = request.seq

    weights, _ = start_weights(ctx.config, federation.fingerprints)
    # what the honest sites compute; also their first training (torch's start-up) before any deadline runs
    survivors = [site_work.train_site(ctx.config, s, weights, 1) for s in ("alpha", "beta", "gamma")]
    serving = threading.Thread(target=sessions, daemon=True)
    serving.start()
    try:
        from quorum.flows import rounds

        secagg, missing = rounds.secure_setup(runner, ctx.job_id, SITES, 1, ctx.config.training)
        replies = runner.train(sorted(secagg.peers), weights, 1, secagg)
        accepted, rejected = rounds.screen_replies(ctx.config, 1, replies, weights)
        rows = {s: fp.train_rows for s, fp in federation.fingerprints.items()}
        result, unrevealed, _ = rounds.aggregate_secure(runner, secagg, 1, weights, accepted, ctx.config.training, rows)
    finally:
        stop.set()
        serving.join(timeout=5)

    assert missing == {} and sorted(secagg.peers) == sorted(SITES)
    assert list(rejected) == ["delta"] and "did not answer" in rejected["delta"] and unrevealed == {}
    expected = fedavg([(u.weights, u.num_examples) for u in survivors])
    for got, want in zip(result, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [r["dropped"] for r in _requests(runner) if r["kind"] == "reveal"] == [["delta"]]


def _requests(runner: Any) -> list[dict[str, Any]]:
    """Every request the coordinator posted in this job, oldest first."""
    folder = runner.exchange.store.checkout(f"jobs/{runner.ctx.job_id}/requests")
    return [json.loads(p.read_text()) for p in sorted(folder.glob("0*.json"))]


def test_a_site_failing_to_train_under_secure_aggregation_is_left_out(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    honest = site_work.train_site

    def delta_fails(config: Any, site_id: str, weights: Weights, server_round: int) -> SiteUpdate:
        if site_id == "delta":
            raise SiteDataError("delta's disk is gone", fix="replace it")
        return honest(config, site_id, weights, server_round)

    monkeypatch.setattr(site_work, "train_site", delta_fails)

    tuned = tune(federation, "secure-dropout", rounds=1, secure_aggregation=True)

    record = tuned.result.rounds[0]
    assert record.sites == ("alpha", "beta", "gamma") and "disk is gone" in record.rejected["delta"]
