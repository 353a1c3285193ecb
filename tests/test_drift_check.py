"""The drift-check flow: every site's newest drift summary, the k-site decision, the retraining trigger.

Flows run under the session's temporary Prefect API. The trigger that would start the lifecycle
deployment is replaced by a fake that records what it was asked, so no server or worker is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from quorum.cli.main import main
from quorum.configs.schema import load_federation
from quorum.evaluation.drift import DriftSummary, FeatureDrift
from quorum.flows import drift_check
from quorum.lineage.artifacts import LocalArtifactStore
from quorum.lineage.audit import AuditLog
from quorum.lineage.state import StateLayout
from quorum.tasks.site import preprocess_site
from quorum.tasks.wire import encode_drift
from tests.federation import write_federation, write_governance


class FakeTrigger:
    """Stands in for ``start_lifecycle``: records each request and returns a made-up flow run id."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], dict[str, str]]] = []

    def __call__(self, reason: str, drifting: Sequence[str], evidence: Mapping[str, str]) -> str:
        self.calls.append((reason, tuple(drifting), dict(evidence)))
        return f"fake-run-{len(self.calls)}"


@pytest.fixture
def fake_trigger(monkeypatch: pytest.MonkeyPatch) -> FakeTrigger:
    fake = FakeTrigger()
    monkeypatch.setattr(drift_check, "start_lifecycle", fake)
    return fake


@pytest.fixture
def quiet_console_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI trims Prefect's console for good (right for one process per command); keep it for this test."""
    monkeypatch.setattr("quorum.cli.commands._quiet_console", lambda verbose: None)


def _audit(config_path: Path) -> AuditLog:
    return AuditLog(StateLayout(load_federation(config_path).state_dir).audit_log)


# --- end to end: the sites check their own data, the flow decides and triggers ----------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, prefect_harness: Path) -> tuple[Path, Path]:
    """Three synthetic sites, preprocessed; beta's current window drifts (quorum.tasks.synth), k = 1."""
    root = tmp_path_factory.mktemp("drift-check")
    config_path = write_federation(root)
    governance_path, _ = write_governance(root)
    config = load_federation(config_path)
    for site_id in config.site_ids:
        assert preprocess_site(config, site_id).contract.passed
    return config_path, governance_path


def test_drifting_site_triggers_retraining_once_with_reason_and_audit(
    federation: tuple[Path, Path], fake_trigger: FakeTrigger
) -> None:
    config_path, governance_path = federation

    first = drift_check.drift_check_flow(str(config_path), str(governance_path), trigger=True, check_sites=True)
    again = drift_check.drift_check_flow(str(config_path), str(governance_path), trigger=True)

    assert first.retrain and "beta" in first.drifting
    [(reason, drifting, evidence)] = fake_trigger.calls  # the second check saw the same summaries
    assert reason == first.reason and "beta" in reason and reason.startswith("retrain: ")
    assert drifting == first.drifting and set(evidence) == set(first.drifting)
    assert first.triggered_run == "fake-run-1"
    store = LocalArtifactStore(StateLayout(load_federation(config_path).state_dir).artifacts)
    assert all(store.exists(key) for key in first.evidence.values()) and set(first.evidence) == {
        "alpha",
        "beta",
        "gamma",
    }
    [entry] = [e for e in _audit(config_path).entries() if e.event == "retraining_triggered"]
    assert entry.actor == "drift-check"
    assert entry.details["reason"] == reason and entry.details["flow_run_id"] == "fake-run-1"
    assert entry.details["sites"] == list(drifting) and entry.details["deployment"] == "lifecycle/lifecycle"
    assert again.retrain and again.triggered_run is None and "already triggered" in again.note


def test_without_trigger_the_decision_is_reported_and_nothing_is_started(
    federation: tuple[Path, Path], fake_trigger: FakeTrigger
) -> None:
    config_path, governance_path = federation
    before = len(_audit(config_path).entries())

    result = drift_check.drift_check_flow(str(config_path), str(governance_path), trigger=False)

    assert result.retrain and result.triggered_run is None
    assert fake_trigger.calls == []
    assert len(_audit(config_path).entries()) == before


def test_cli_trigger_in_local_mode_says_retraining_needs_quorum_up(
    federation: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path, governance_path = federation
    monkeypatch.delenv("PREFECT_API_URL", raising=False)

    code = main(["drift-check", "--config", str(config_path), "--governance", str(governance_path), "--trigger"])

    err = capsys.readouterr().err
    assert code == 10
    assert err.startswith("error: Needs the deployed stack") and "`quorum up`" in err and "fix:" in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("quiet_console_off")
def test_cli_without_trigger_prints_each_site_and_the_decision(
    federation: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config_path, governance_path = federation

    code = main(["drift-check", "--config", str(config_path), "--governance", str(governance_path)])

    out = capsys.readouterr().out
    assert code == 0
    assert all(site_id in out for site_id in ("alpha", "beta", "gamma"))
    assert "retrain: " in out and "quorum drift-check --trigger" in out


# --- the k-site rule on stored summaries ------------------------------------------------------------


def _summary(site_id: str, drifting: bool) -> DriftSummary:
    features = tuple(FeatureDrift(f"f{i}", "K-S p_value", 0.01 if drifting else 0.5, 0.05, drifting) for i in range(3))
    return DriftSummary(site_id, 500, 400, features, 1.0 if drifting else 0.0, None, ())


@pytest.fixture
def stored(tmp_path: Path, prefect_harness: Path) -> tuple[Path, Path]:
    """Three sites (no data needed) whose drift summaries are written straight into the store; k = 2."""
    config_path = write_federation(tmp_path, extra={"drift": {"min_sites_to_retrain": 2, "min_rows": 30}})
    governance_path, _ = write_governance(tmp_path)
    return config_path, governance_path


def _store(config_path: Path, drifting: Sequence[str], stamp: str = "20260101T000000Z") -> LocalArtifactStore:
    store = LocalArtifactStore(StateLayout(load_federation(config_path).state_dir).artifacts)
    for site_id in ("alpha", "beta", "gamma"):
        payload = {"champion_version": "1", **encode_drift(_summary(site_id, site_id in drifting))}
        store.put_json(drift_check.summary_key(site_id, stamp), payload)
    return store


@pytest.mark.parametrize(
    ("drifting", "retrain"),
    [
        ((), False),  # nobody drifts
        (("beta",), False),  # one site is below k = 2: an odd site does not retrain the federation
        (("alpha", "gamma"), True),  # exactly k sites drift
        (("alpha", "beta", "gamma"), True),  # more than k
    ],
)
def test_retraining_needs_k_drifting_sites(
    stored: tuple[Path, Path], fake_trigger: FakeTrigger, drifting: tuple[str, ...], retrain: bool
) -> None:
    config_path, governance_path = stored
    _store(config_path, drifting)

    result = drift_check.drift_check_flow(str(config_path), str(governance_path), trigger=True)

    assert result.retrain is retrain
    assert result.drifting == drifting
    assert len(fake_trigger.calls) == int(retrain)
    events = [e.event for e in _audit(config_path).entries()]
    assert events == (["retraining_triggered"] if retrain else [])


def test_newest_summary_counts_and_new_evidence_triggers_again(
    stored: tuple[Path, Path], fake_trigger: FakeTrigger
) -> None:
    config_path, governance_path = stored
    _store(config_path, ("alpha", "beta"), stamp="20260101T000000Z")
    first = drift_check.drift_check_flow(str(config_path), str(governance_path), trigger=True)
    _store(config_path, ("alpha", "gamma"), stamp="20260102T000000Z")

    second = drift_check.drift_check_flow(str(config_path), str(governance_path), trigger=True)

    assert first.drifting == ("alpha", "beta") and second.drifting == ("alpha", "gamma")
    assert [call[1] for call in fake_trigger.calls] == [("alpha", "beta"), ("alpha", "gamma")]
    assert second.evidence["alpha"].endswith("20260102T000000Z.json")


def test_unreadable_or_missing_summaries_are_reported_per_site(
    stored: tuple[Path, Path], fake_trigger: FakeTrigger
) -> None:
    config_path, governance_path = stored
    store = _store(config_path, ("alpha", "beta"))
    store.put_bytes(drift_check.summary_key("gamma", "20260105T000000Z"), b"{not json")

    result = drift_check.drift_check_flow(str(config_path), str(governance_path), trigger=False)

    assert set(result.summaries) == {"alpha", "beta"}
    assert "not JSON" in result.unavailable["gamma"] and "20260105T000000Z" in result.unavailable["gamma"]
    assert result.retrain and "2 of 2 sites" in result.reason
