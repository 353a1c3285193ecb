"""`quorum up`'s workers come from one host process that imports Prefect once and forks them.

Against a real Prefect server (its own, on a free loopback port): every worker is a process group of
its own, in its site's folder; a site worker's environment, and that of a flow run it starts, names
only its own data root and none of the coordinator's credentials; stopping one site's worker leaves
the others polling; ``Stack.stop`` stops them all. (A forked worker's ``/proc/PID/environ`` still shows
the host's environment, so the flow run's is what is checked.)
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from quorum.configs.schema import FederationConfig
from quorum.infra.stack import Stack
from quorum.lineage.state import SITE_ROOT_ENV, StateLayout
from tests.ports import free_port
from tests.prefect_server import alive, wait_until

pytestmark = pytest.mark.integration

SECRET = "coordinator-only-key-id"
PROBE = """
import json, os
from pathlib import Path

from prefect import flow


@flow(name="env-probe")
def env_probe(out: str) -> None:
    Path(out).write_text(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ)}))
"""


def test_each_worker_is_its_own_isolated_process_and_so_are_its_flow_runs(
    tmp_path: Path, prefect_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: two sites and the coordinator, the coordinator's shell holding an S3 key
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET)
    roots = {site: tmp_path / "sites" / site for site in ("alpha", "beta")}
    config = FederationConfig.model_validate(
        {
            "name": "host",
            "model_name": "m",
            "features": {"numeric": ["x"]},
            "state_dir": str(tmp_path / "state"),
            "sites": {site: {"root": str(root)} for site, root in roots.items()},
            "deployment": {"prefect_port": prefect_port, "mlflow_port": free_port()},
        }
    )
    stack = Stack(config, StateLayout(config.state_dir))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    pids: dict[str, int | None] = {}
    try:
        # Act: what `quorum up` does for the workers
        pools = stack.ensure_pools()
        stack.start_workers(tmp_path)
        stack.wait_for_workers(pools, timeout_s=300)

        # Assert: one process group per worker, each in its own folder with its own environment
        pids = {name: stack.service(f"worker-{name}").pid() for name in ("alpha", "beta", "coordinator")}
        assert all(pid is not None for pid in pids.values()) and len(set(pids.values())) == 3
        for name, pid in pids.items():
            assert pid is not None and os.getpgid(pid) == pid
            expected_cwd = roots.get(name, tmp_path)
            assert Path(os.readlink(f"/proc/{pid}/cwd")) == expected_cwd.resolve()

        # a flow run on alpha's pool (a worker's own environment is what its flow runs start with):
        # alpha's folder, alpha's data root, none of the coordinator's credentials
        out = tmp_path / "probe.json"
        with stack.client() as client:
            flow_id = client.create_flow_from_name("env-probe")
            deployment = client.create_deployment(  # as `quorum infra render` writes a site's deployments
                flow_id,
                "probe-alpha",
                entrypoint=f"{probe}:env_probe",
                work_pool_name="site-alpha",
                job_variables={"working_dir": str(roots["alpha"])},
            )
            client.create_flow_run_from_deployment(deployment, parameters={"out": str(out)})
        wait_until(out.exists, 300, "the flow run on site-alpha's pool did not write its probe")
        seen = json.loads(out.read_text())
        assert Path(seen["cwd"]) == roots["alpha"].resolve()
        assert seen["env"][SITE_ROOT_ENV] == str(roots["alpha"]) and "AWS_ACCESS_KEY_ID" not in seen["env"]

        # stopping one site's worker stops that site alone
        beta_pid, alpha_pid, coordinator_pid = pids["beta"], pids["alpha"], pids["coordinator"]
        assert beta_pid is not None and alpha_pid is not None and coordinator_pid is not None
        os.killpg(beta_pid, signal.SIGKILL)
        wait_until(lambda: not alive(beta_pid), 30, "beta's worker did not stop")
        assert alive(alpha_pid) and alive(coordinator_pid)
    finally:
        stopped = stack.stop()

    assert set(stopped) >= {"worker-alpha", "worker-coordinator"}
    wait_until(lambda: not any(alive(pid) for pid in pids.values() if pid is not None), 30, "workers outlived stop")
