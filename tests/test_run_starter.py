"""Site flow runs are forked by the site run starter, with their modules already imported.

Against a real Prefect server and real process workers, as ``quorum up`` starts them: a flow run on a
site's pool (with the command every site deployment has) runs in a process forked by the starter; it
finds Great Expectations and torch loaded without importing them; it has its site's folder and data
root and none of the coordinator's credentials, while the starter itself holds neither. Cancelling
the run from Prefect reaches the forked process. With the starter stopped, a site run still runs, in
a new process of its own.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from quorum.configs.schema import FederationConfig
from quorum.infra.deployments import site_pool
from quorum.infra.stack import STARTER, Stack
from quorum.lineage.state import SITE_ROOT_ENV, StateLayout
from tests.ports import free_port
from tests.prefect_server import alive, wait_until

pytestmark = pytest.mark.integration

SECRET = "coordinator-only-key-id"
PROBE = """
import json, os, sys, time
from pathlib import Path

from prefect import flow


@flow(name="starter-probe")
def starter_probe(out: str, sleep_s: float = 0.0) -> None:
    seen = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "preloaded": sorted(m for m in ("great_expectations", "torch") if m in sys.modules),
    }
    Path(out).write_text(json.dumps(seen))
    time.sleep(sleep_s)
"""


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _final_state(stack: Stack, run_id: UUID, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with stack.client() as client:
            state = client.read_flow_run(run_id).state
        if state is not None and state.is_final():
            return str(state.type.value)
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not end within {timeout_s:.0f}s")


def test_site_runs_are_forked_preloaded_isolated_and_cancellable(
    tmp_path: Path, prefect_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: one site and the coordinator, the coordinator's shell holding an S3 key
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET)
    root = tmp_path / "sites" / "alpha"
    config = FederationConfig.model_validate(
        {
            "name": "starter",
            "model_name": "m",
            "features": {"numeric": ["x"]},
            "state_dir": str(tmp_path / "state"),
            "sites": {"alpha": {"root": str(root)}},
            "deployment": {"prefect_port": prefect_port, "mlflow_port": free_port()},
        }
    )
    stack = Stack(config, StateLayout(config.state_dir))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    starter_pid: int | None = None
    try:
        pools = stack.ensure_pools()
        stack.start_workers(tmp_path)
        stack.wait_for_workers(pools, timeout_s=300)
        starter_pid = stack.service(STARTER).pid()
        assert starter_pid is not None and alive(starter_pid)
        with stack.client() as client:
            flow_id = client.create_flow_from_name("starter-probe")
            deployment = client.create_deployment(  # with the command `quorum infra render` gives site deployments
                flow_id,
                "probe-alpha",
                entrypoint=f"{probe}:starter_probe",
                work_pool_name=site_pool("alpha"),
                job_variables={
                    "working_dir": str(root),
                    "command": shlex.join([sys.executable, "-m", "quorum.infra.start_run"]),
                },
            )

        def start(out: Path, sleep_s: float = 0.0) -> UUID:
            with stack.client() as client:
                run = client.create_flow_run_from_deployment(
                    deployment, parameters={"out": str(out), "sleep_s": sleep_s}
                )
            return run.id

        # Act 1: a site run while the starter serves
        first = tmp_path / "first.json"
        first_id = start(first)
        assert _final_state(stack, first_id, 300) == "COMPLETED"
        seen: dict[str, Any] = json.loads(first.read_text())

        # Assert 1: forked by the starter, modules loaded, the site's folder and environment only
        assert seen["ppid"] == starter_pid
        assert seen["preloaded"] == ["great_expectations", "torch"]
        assert Path(seen["cwd"]) == root.resolve()
        assert seen["env"][SITE_ROOT_ENV] == str(root) and "AWS_ACCESS_KEY_ID" not in seen["env"]
        starter_env = _environ(starter_pid)
        assert SITE_ROOT_ENV not in starter_env and "AWS_ACCESS_KEY_ID" not in starter_env

        # Act 2: cancel a long run from Prefect, as the UI's Cancel button does
        second = tmp_path / "second.json"
        second_id = start(second, sleep_s=600)
        wait_until(second.exists, 300, "the long run did not start")
        forked = int(json.loads(second.read_text())["pid"])
        from prefect.states import Cancelling

        with stack.client() as client:
            client.set_flow_run_state(second_id, Cancelling(), force=True)

        # Assert 2: the forked process ends and Prefect records the cancellation
        wait_until(lambda: not alive(forked), 120, "the cancelled run's forked process kept running")
        assert _final_state(stack, second_id, 120) == "CANCELLED"

        # Act 3: stop the starter, then start a site run
        os.killpg(starter_pid, 15)
        wait_until(lambda: not alive(starter_pid or 0), 30, "the starter did not stop")
        third = tmp_path / "third.json"
        third_id = start(third)

        # Assert 3: it runs all the same, in a process of its own that imports what it needs
        assert _final_state(stack, third_id, 300) == "COMPLETED"
        alone = json.loads(third.read_text())
        assert alone["ppid"] != starter_pid and alone["preloaded"] == []
        assert alone["env"][SITE_ROOT_ENV] == str(root)
    finally:
        stack.stop()
    assert not stack.starter_socket.exists()
