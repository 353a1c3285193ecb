"""The whole lifecycle on a tiny federation, under a temporary Prefect API, in a temp dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quorum.configs.schema import load_federation, load_governance
from quorum.lineage.artifacts import LocalArtifactStore
from quorum.lineage.registry import verify_version
from quorum.lineage.state import StateLayout
from tests.federation import write_federation, write_governance


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory: pytest.TempPathFactory, prefect_harness: Path):  # type: ignore[no-untyped-def]
    from quorum.flows.lifecycle import lifecycle

    root = tmp_path_factory.mktemp("federation")
    config_path = write_federation(root, rounds=3)
    governance_path, keys = write_governance(root)
    result = lifecycle(str(config_path), str(governance_path), keys[:2])
    return root, config_path, governance_path, result


def test_champion_exists_and_its_signatures_verify(lifecycle_run) -> None:  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    _, config_path, governance_path, result = lifecycle_run
    config = load_federation(config_path)
    state = StateLayout(config.state_dir)
    client = MlflowClient(tracking_uri=state.tracking_uri, registry_uri=state.tracking_uri)

    champion = client.get_model_version_by_alias(config.model_name, "champion")
    quorum = verify_version(
        LocalArtifactStore(state.artifacts), load_governance(governance_path), config.model_name, str(champion.version)
    )

    assert result.promotion.champion and str(champion.version) == result.promotion.version
    assert set(quorum.valid_approvers) == {"ann", "ben"}
    assert champion.tags["verdict"] == "passed"


def test_mlflow_run_holds_dataset_inputs_and_round_metrics(lifecycle_run) -> None:  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    _, config_path, _, result = lifecycle_run
    state = StateLayout(load_federation(config_path).state_dir)
    client = MlflowClient(tracking_uri=state.tracking_uri)

    parent = client.get_run(result.run_id)
    digests = {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    tune = next(r for r in children if r.info.run_name == "tune")
    history = client.get_metric_history(tune.info.run_id, "train_loss")

    expected = {f"{s}-processed": fp.data_hash for s, fp in result.preprocess.fingerprints.items()}
    assert digests == expected
    assert all(d.endswith(".dir") for d in digests.values())
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert {r.info.run_name for r in children} == {"preprocess", "tune", "evaluate", "promote", "monitor"}
    assert parent.data.tags["git_commit"]


def test_each_stage_has_its_seconds_in_the_table_and_on_the_parent_run(lifecycle_run) -> None:  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    from quorum.cli.report import timed_rows

    _, config_path, _, result = lifecycle_run
    state = StateLayout(load_federation(config_path).state_dir)
    metrics = MlflowClient(tracking_uri=state.tracking_uri).get_run(result.run_id).data.metrics
    stages = ("preprocess", "tune", "evaluate", "promote", "monitor")

    rows = timed_rows(result, launched_s=result.first_stage_at - 2.5)

    assert set(result.stage_seconds) == set(stages) and all(s > 0 for s in result.stage_seconds.values())
    assert {k: v for k, v in metrics.items() if k.startswith("stage_seconds.")} == {
        f"stage_seconds.{s}": pytest.approx(result.stage_seconds[s]) for s in stages
    }
    assert rows[0] == ("start-up", "done", "imports, Prefect API, tracking store, job record", "2.5 s")
    timed = [(row[0], row[3]) for row in rows[1:] if row[3]]  # the placement row is figures only, no stage
    assert timed == [(s, f"{result.stage_seconds[s]:.1f} s") for s in stages]


def test_audit_log_records_the_decisions(lifecycle_run) -> None:  # type: ignore[no-untyped-def]
    from quorum.lineage.audit import AuditLog

    _, config_path, _, _ = lifecycle_run
    log = AuditLog(StateLayout(load_federation(config_path).state_dir).audit_log)

    events = [e.event for e in log.entries()]

    assert log.verify() == len(events)
    assert events[:2] == ["gate_verdict", "promotion"]


def test_fine_tuning_starts_from_the_verified_champion_with_a_frozen_layer(  # type: ignore[no-untyped-def]
    lifecycle_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quorum.flows import rounds
    from quorum.flows.context import load_context
    from quorum.flows.runners.local import LocalRunner
    from quorum.flows.tuning import tune_flow

    root, _, governance_path, result = lifecycle_run
    training = {"start_from": "champion", "freeze_layers": 1}
    config_path = write_federation(root, rounds=1, training=training, name="fine-tune.yaml")  # same state dir
    ctx = load_context(str(config_path), str(governance_path), "fine-tune-job")
    verified: list[str] = []
    real = rounds.load_verified_weights
    monkeypatch.setattr(rounds, "load_verified_weights", lambda *a: verified.append(a[-1]) or real(*a))
    prep = result.preprocess
    fingerprints = {s: prep.fingerprints[s] for s in prep.usable_sites}

    tuned = tune_flow(ctx, LocalRunner(ctx.config), fingerprints, ctx.tracker.start_run("fine-tune"))

    champion = real(ctx.tracker, ctx.store, ctx.governance, ctx.config.model_name, result.promotion.version)
    assert verified == [result.promotion.version]  # loaded only through the verifying loader
    for index in range(4):  # scaling buffers, then the first Linear layer's weight and bias
        np.testing.assert_array_equal(tuned.weights[index], champion[index])
    assert not np.array_equal(tuned.weights[-2], champion[-2])  # the head was fine-tuned
