"""A scheduled-style lifecycle run holds no key: a real process worker runs it from its deployment, the
lifecycle run itself pauses awaiting approval (its promote subflow registered and verified the
candidate and completed), and `quorum approve` (the quorum of keys, one command each) resumes it, after
which the lifecycle run monitors and completes.

Real servers on free loopback ports in a temp folder (the Prefect and MLflow servers `quorum up`
starts) and one process worker on the coordinator's pool. The run's sites work in-process
(``runner: local``) so no site worker is needed: what is under test is the pause and the resume.
Every process started here is stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from quorum.configs.schema import load_federation, load_governance
from quorum.flows.approval import approval_key
from quorum.infra.deployments import COORDINATOR_POOL, render, write
from quorum.infra.stack import Stack
from quorum.lineage import champion
from quorum.lineage.artifacts import federation_store
from quorum.lineage.audit import AuditLog
from quorum.lineage.state import StateLayout
from tests.federation import POOL_GATES, pin_governance_root, write_federation, write_governance
from tests.ports import free_port
from tests.stack_api import using_stack

pytestmark = pytest.mark.integration
QUORUM = str(Path(sys.executable).with_name("quorum"))
MODEL = "test-model"
WAIT_S = 900  # a bound on waiting for a state, not a timing assertion: a busy 2-core machine is slow


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Servers, the coordinator's pool and worker, and the rendered lifecycle deployment (no schedule)."""
    root = tmp_path
    deployment = {"prefect_port": free_port(), "mlflow_port": free_port()}
    config_path = write_federation(
        root, ("alpha", "beta"), rounds=2, min_sites=1, gates=POOL_GATES, extra={"deployment": deployment}
    )
    governance_path, keys = write_governance(root)
    pin_governance_root(config_path, governance_path)
    config = load_federation(config_path)
    running = Stack(config, StateLayout(config.state_dir).ensure())
    with using_stack(running):
        running.start_servers()
        running.ensure_pools()
        document = render(config, governance_path, root)
        # only the lifecycle, and no schedule: the one run of this test is the one it starts
        lifecycle = [{**d, "schedules": []} for d in document["deployments"] if d["name"] == "lifecycle"]
        prefect_file = root / "prefect.yaml"
        write({**document, "deployments": lifecycle}, prefect_file)
        running.deploy(prefect_file, root)
        running.start_workers(root, site_workers=False)
        running.wait_for_workers([COORDINATOR_POOL], timeout_s=WAIT_S)
        yield {"root": root, "config": config_path, "governance": governance_path, "keys": keys, "stack": running}


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _state(client: Any, run_id: Any) -> str:
    run = client.read_flow_run(run_id)
    return run.state.type.value if run.state is not None else "NONE"


def _paused_lifecycle(stack: Stack, lifecycle_id: Any, audit: AuditLog) -> Any:
    """Wait until the lifecycle run is Paused after an ``awaiting_approval`` entry; the run, as read then."""
    deadline = time.monotonic() + WAIT_S
    with stack.client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(lifecycle_id)
            state = run.state.type.value if run.state is not None else "NONE"
            waiting = audit.path.exists() and any(e.event == "awaiting_approval" for e in audit.entries())
            if state in FINAL or (state == "PAUSED" and waiting):
                return run
            time.sleep(2)
    return None


def _subflow_states(stack: Stack, parent_id: Any) -> dict[str, list[str]]:
    """The states of the parent run's subflow runs, by flow name."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs_filter = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
    states: dict[str, list[str]] = {}
    with stack.client() as client:
        for run in client.read_flow_runs(flow_run_filter=runs_filter):
            name = client.read_flow(run.flow_id).name
            states.setdefault(name, []).append(run.state.type.value if run.state is not None else "NONE")
    return states


def _approval_artifacts(stack: Stack, run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with stack.client() as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def _final_state(stack: Stack, run_id: Any) -> str:
    deadline = time.monotonic() + WAIT_S
    with stack.client() as client:
        while (state := _state(client, run_id)) not in FINAL and time.monotonic() < deadline:
            time.sleep(2)
    return state


def _approve(env: dict[str, Any], version: str, key: str) -> subprocess.CompletedProcess[str]:
    """`quorum approve` as an approver types it, on the same host, pointed at the server."""
    command = [QUORUM, "approve", MODEL, "--version", version, "--key", key]
    command += ["--config", str(env["config"]), "--governance", str(env["governance"])]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    clean["PREFECT_API_URL"] = env["stack"].prefect_url
    return subprocess.run(command, cwd=env["root"], env=clean, text=True, capture_output=True, timeout=WAIT_S)


def test_a_keyless_deployment_run_pauses_for_approval_and_quorum_approve_resumes_it(stack: dict[str, Any]) -> None:
    running: Stack = stack["stack"]
    config = load_federation(stack["config"])
    audit = AuditLog(StateLayout(config.state_dir).audit_log)
    store = federation_store(config)
    with running.client() as client:
        deployment = client.read_deployment_by_name("lifecycle/lifecycle")
        assert "approver_keys" not in (deployment.parameters or {})  # the rendered deployment names no key
        lifecycle = client.create_flow_run_from_deployment(deployment.id, parameters={"runner": "local"})

    paused = _paused_lifecycle(running, lifecycle.id, audit)
    subflows_while_paused = _subflow_states(running, lifecycle.id)
    artifacts = _approval_artifacts(running, lifecycle.id)
    waiting = [e for e in audit.entries() if e.event == "awaiting_approval"] if audit.path.exists() else []

    # the lifecycle run itself is Paused, awaiting approval; its promote subflow registered the candidate and ended
    assert paused is not None and paused.state is not None and paused.state.type.value == "PAUSED"
    assert len(waiting) == 1 and waiting[0].details["flow_run_id"] == str(lifecycle.id)
    version = str(waiting[0].details["version"])
    assert paused.state.state_details.pause_key == approval_key(MODEL, version)
    assert subflows_while_paused.get("promote") == ["COMPLETED"] and "monitor" not in subflows_while_paused
    assert champion.read_current(store, MODEL) is None  # nothing promoted without the approvers
    # the verdict is linked from the paused run: an artifact of the lifecycle run under the pause's key
    linked = [a for a in artifacts if a.key == approval_key(MODEL, version)]
    assert len(linked) == 1 and linked[0].type == "markdown"
    assert f"{MODEL} v{version} awaits approval" in linked[0].data and "verdict.html" in linked[0].data
    assert f"MLflow model `{MODEL}` version {version}" in linked[0].data

    first = _approve(stack, version, stack["keys"][0])
    with running.client() as client:
        after_one = _state(client, lifecycle.id)
    second = _approve(stack, version, stack["keys"][1])
    lifecycle_state = _final_state(running, lifecycle.id)
    subflows = _subflow_states(running, lifecycle.id)
    current = champion.read_current(store, MODEL)

    assert first.returncode == 0, first.stderr + first.stdout
    assert "1 of 2 approvals" in first.stdout and after_one == "PAUSED"
    assert second.returncode == 0, second.stderr + second.stdout
    assert f"{MODEL} v{version} is now the champion" in second.stdout
    assert lifecycle_state == "COMPLETED"
    assert subflows.get("monitor") == ["COMPLETED"]  # after the resume the lifecycle monitored the sites
    assert "promote-approved" not in subflows  # `quorum approve` promoted; the resumed run promoted nothing again
    assert current is not None
    statement = champion.verify_statement(store, load_governance(stack["governance"]), *current, date.today())
    assert (statement.version, statement.sequence, statement.action) == (version, 1, champion.PROMOTION)
    assert sorted(statement.signers) == ["ann", "ben"]
    events = [e.event for e in audit.entries()]
    assert events.count("approval") == 2 and events.count("promotion") == 1
