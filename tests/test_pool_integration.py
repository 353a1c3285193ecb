"""Real dispatch: a Prefect server and MLflow server on free loopback ports, one worker per site pool,
and `quorum run --runner pool` as a user would type it. Every process started here is stopped.

The sites' data carries canaries in every raw column (``tests.canary``); the last test searches
everything the jobs wrote outside the sites, service logs and the Prefect server's database included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from quorum.configs.schema import load_federation
from quorum.infra.deployments import render, write
from quorum.infra.stack import Stack
from quorum.lineage.state import StateLayout
from tests.canary import plant_federation, planted_canaries, scan, scan_text
from tests.federation import POOL_GATES, write_federation, write_governance
from tests.ports import free_port
from tests.stack_api import using_stack

pytestmark = pytest.mark.integration
QUORUM = str(Path(sys.executable).with_name("quorum"))
SITES = ("alpha", "beta")


def _federation(
    root: Path, prefect_port: int, mlflow_port: int, *, rounds: int, min_sites: int, name: str, start_s: float = 240
) -> Path:
    deployment = {
        "prefect_port": prefect_port,
        "mlflow_port": mlflow_port,
        "round_deadline_s": 30,
        "session_start_timeout_s": start_s,
    }
    return write_federation(
        root,
        SITES,
        rounds=rounds,
        min_sites=min_sites,
        gates=POOL_GATES,
        extra={"deployment": deployment, "drift": {"min_rows": 30}},
        name=name,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("pool")
    config_path = _federation(root, free_port(), free_port(), rounds=3, min_sites=1, name="federation.yaml")
    governance_path, keys = write_governance(root)
    config = load_federation(config_path)
    plant_federation(config)  # every job of this module reads these sites' data (the later configs reuse it)
    state = StateLayout(config.state_dir).ensure()
    running = Stack(config, state)
    with using_stack(running):
        running.start_servers()
        pools = running.ensure_pools()
        prefect_file = root / "prefect.yaml"
        write(render(config, governance_path, root), prefect_file)
        running.deploy(prefect_file, root)
        running.start_workers(root)
        running.wait_for_workers(pools, timeout_s=120)
        yield {
            "root": root,
            "config": config_path,
            "governance": governance_path,
            "keys": keys,
            "stack": running,
            "outputs": [],
        }


def _quorum_run(env: dict[str, Any], config: Path, job_id: str, **popen: Any) -> subprocess.Popen[str]:
    command = [
        QUORUM,
        "run",
        "--runner",
        "pool",
        "--config",
        str(config),
        "--governance",
        str(env["governance"]),
        "--job-id",
        job_id,
        "--approve-with",
        env["keys"][0],
        "--approve-with",
        env["keys"][1],
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return subprocess.Popen(
        command, cwd=env["root"], env=clean, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen
    )


def _finish(env: dict[str, Any], process: subprocess.Popen[str]) -> tuple[str, str]:
    """Wait for a `quorum run`; what it printed is kept for the canary scan at the end."""
    out, err = process.communicate(timeout=600)
    env["outputs"].append(out + err)
    return out, err


def _flow_runs(api: str, job_id: str) -> list[dict[str, Any]]:
    response = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [f"job:{job_id}"]}}})
    response.raise_for_status()
    return list(response.json())


def _logs(api: str, flow_run_id: str) -> list[str]:
    response = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
    response.raise_for_status()
    return [entry["message"] for entry in response.json()]


def test_lifecycle_runs_each_site_on_its_own_pool(stack: dict[str, Any]) -> None:
    process = _quorum_run(stack, stack["config"], "pool-job-1")
    out, err = _finish(stack, process)
    api = stack["stack"].prefect_url
    sessions = _flow_runs(api, "pool-job-1")
    config = load_federation(stack["config"])

    assert process.returncode == 0, err + out
    assert "champion" in out and "Traceback" not in err
    assert sorted(run["parameters"]["site_id"] for run in sessions) == sorted(SITES)
    for run in sessions:
        site = config.site(run["parameters"]["site_id"])
        assert run["work_pool_name"] == f"site-{site.id}"
        assert run["state_type"] == "COMPLETED"
        assert any(f"(cwd {site.root})" in line for line in _logs(api, run["id"]))
        assert (site.processed_dir / "train.parquet").is_file()
    _assert_the_sites_compared_the_signed_variants(stack, config, "pool-job-1")


def _assert_the_sites_compared_the_signed_variants(stack: dict[str, Any], config: Any, job_id: str) -> None:
    """The promotion's variant check went through the sessions: the shipped bytes are the signed files."""
    from mlflow import MlflowClient

    from quorum.lineage.registry import model_key

    client = MlflowClient(tracking_uri=stack["stack"].mlflow_url)
    versions = client.search_model_versions(f"name='{config.model_name}'")
    [version] = [v for v in versions if v.tags.get("quorum.job_id") == job_id]
    artifacts = StateLayout(config.state_dir).artifacts
    [shipped] = sorted((artifacts / "jobs" / job_id / "requests").glob("*/onnx.bin"))
    signed = artifacts / model_key(config.model_name, version.version) / "onnx" / "model.onnx"

    assert version.tags["variant.sites"] == "alpha,beta" and version.tags["variant.sites_skipped"] == "none"
    assert abs(float(version.tags["variant.onnx.auc_delta"])) < 1e-3
    assert shipped.read_bytes() == signed.read_bytes()


def test_job_finishes_when_a_site_worker_is_killed_mid_job(stack: dict[str, Any]) -> None:
    config_path = _federation(stack["root"], *_ports(stack), rounds=6, min_sites=1, name="long.yaml")
    store = StateLayout(load_federation(config_path).state_dir).artifacts / "jobs" / "pool-job-2" / "rounds"
    process = _quorum_run(stack, config_path, "pool-job-2")
    deadline = time.monotonic() + 300
    while not (store / "0002" / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    worker = stack["stack"].service("worker-beta")
    os.killpg(worker.pid(), signal.SIGKILL)

    out, err = _finish(stack, process)
    manifests = [json.loads((store / f"{r:04d}" / "manifest.json").read_text()) for r in range(1, 7)]

    assert process.returncode == 0, err + out
    assert manifests[0]["sites"] == ["alpha", "beta"]
    assert manifests[-1]["sites"] == ["alpha"] and "beta" in manifests[-1]["rejected"]


def test_a_site_without_worker_fails_the_job_with_a_clear_message(stack: dict[str, Any]) -> None:
    # runs after the killed-worker test: site beta has no worker any more
    config_path = _federation(stack["root"], *_ports(stack), rounds=2, min_sites=2, name="strict.yaml", start_s=20)
    process = _quorum_run(stack, config_path, "pool-job-3")

    _out, err = _finish(stack, process)

    assert process.returncode != 0
    assert "site beta did not answer" in err and "prefect worker start --pool site-beta" in err
    assert "Traceback" not in err


def _ports(stack: dict[str, Any]) -> tuple[int, int]:
    config = load_federation(stack["config"])
    return config.deployment.prefect_port, config.deployment.mlflow_port


def test_no_canary_leaves_the_sites_in_pool_mode(stack: dict[str, Any]) -> None:
    # runs last: after every job of this module, on everything they wrote
    config = load_federation(stack["config"])
    state = StateLayout(config.state_dir)
    services = stack["stack"].folder
    canaries = planted_canaries(config)
    stores = [
        state.mlflow_db,
        state.mlflow_artifacts,
        state.artifacts,
        state.audit_log,
        state.prefect_home / "prefect.db",
        *(services / f"{name}.log" for name in ("prefect-server", "mlflow-server", *(f"worker-{s}" for s in SITES))),
    ]

    found = scan([stack["root"]], canaries, skip=[site.root for site in config.sites])
    printed = [hit for index, text in enumerate(stack["outputs"]) for hit in scan_text(text, f"run {index}", canaries)]

    assert [str(place) for place in stores if not found.covers(place)] == []
    assert len(stack["outputs"]) == 3  # every `quorum run` of this module
    assert found.hits == (), found.report()
    assert printed == []
