"""The sites' services under `quorum up` / `status` / `down`.

A service started the way `quorum up` starts it (waiting for a champion) on a fresh federation
answers 503 on a free loopback port; a held port is refused with what to do; `down`'s last resort
stops exactly the process a serve flow recorded for its own flow run, nothing else; and the real
`quorum up` / `status` / `down` start, show and stop a site's service on its pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import pytest

from quorum.configs.errors import QuorumError
from quorum.configs.schema import load_federation
from quorum.flows.deploy import load_site_context
from quorum.flows.serve import service_record
from quorum.flows.serving import start_service
from quorum.infra.serving_stack import (
    RECORD,
    health_line,
    port_answers,
    read_services,
    require_free_port,
    stop_serving,
)
from quorum.infra.stack import Stack
from quorum.lineage.state import StateLayout
from tests.federation import pin_governance_root, write_federation, write_governance
from tests.ports import free_port

pytestmark = pytest.mark.integration  # a real HTTP service and a real server process
QUORUM = str(Path(sys.executable).with_name("quorum"))


def test_a_service_started_before_any_promotion_answers_503_until_a_champion_verifies(tmp_path: Path) -> None:
    config = write_federation(tmp_path, ("alpha", "beta"))
    governance, _ = write_governance(tmp_path)
    pin_governance_root(config, governance)
    port = free_port()

    alpha = load_site_context(str(config), str(governance), "alpha")
    running = start_service(alpha, "alpha", port, wait_for_champion=True)
    try:
        assert health_line(port) == "no verified champion loaded yet (503)"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=b'{"rows": [{"age": 1}]}')
        with pytest.raises(urllib.error.HTTPError) as unavailable:
            urllib.request.urlopen(request, timeout=30)
        answer = json.loads(unavailable.value.read())
        with pytest.raises(QuorumError) as held:
            require_free_port("alpha", port)
        with pytest.raises(QuorumError) as bind:
            start_service(load_site_context(str(config), str(governance), "beta"), "beta", port, wait_for_champion=True)
    finally:
        running.stop()

    assert unavailable.value.code == 503 and answer["error"] and answer["fix"]
    assert "serving.ports.alpha" in held.value.fix and str(port) in held.value.message
    assert f"127.0.0.1:{port}" in bind.value.message and "serving.ports.beta" in bind.value.fix
    assert health_line(port) == "not answering"


def _stack_with_service(tmp_path: Path, port: int, flow_run_id: str) -> tuple[Stack, Path]:
    """A stack whose record names one service of site alpha; and where alpha's serve flow records its pid."""
    config = load_federation(write_federation(tmp_path, ("alpha",), min_sites=1))
    stack = Stack(config, StateLayout(config.state_dir))
    stack.folder.mkdir(parents=True, exist_ok=True)
    services = {"services": [{"site_id": "alpha", "port": port, "flow_run_id": flow_run_id}]}
    (stack.folder / RECORD).write_text(json.dumps(services))
    return stack, service_record(config.site("alpha").root)


def _listener(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"])
    deadline = time.monotonic() + 60
    while not port_answers(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    return process


@pytest.mark.parametrize("same_run", [True, False], ids=["its-own-run", "another-run"])
def test_down_stops_only_the_process_recorded_for_the_services_flow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_run: bool
) -> None:
    monkeypatch.setattr("quorum.infra.serving_stack.STOP_TIMEOUT_S", 1.0)
    port = free_port()
    process = _listener(port)
    try:
        stack, record = _stack_with_service(tmp_path, port, "run-1")
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            json.dumps({"pid": process.pid, "port": port, "flow_run_id": "run-1" if same_run else "run-2"})
        )
        assert [s.url for s in read_services(stack)] == [f"http://127.0.0.1:{port}"]

        stopped = stop_serving(stack, prefect_alive=False)

        assert stopped == ["serve-alpha"] and read_services(stack) == []
        assert (process.wait(timeout=30) is not None) if same_run else process.poll() is None
    finally:
        process.kill()
        process.wait(timeout=30)


def _cli_env() -> dict[str, str]:
    """This shell's environment without any Prefect or MLflow endpoint: the stack names its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}


def test_quorum_up_starts_each_sites_service_and_down_stops_it(tmp_path: Path) -> None:
    serve_port = free_port()
    deployment = {"prefect_port": free_port(), "mlflow_port": free_port()}
    serving = {"ports": {"alpha": serve_port}, "start_with_up": True}
    config = write_federation(tmp_path, ("alpha",), min_sites=1, extra={"deployment": deployment, "serving": serving})
    governance, _ = write_governance(tmp_path)
    pin_governance_root(config, governance)
    base = ["--config", str(config)]
    run = partial(subprocess.run, cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=900)
    try:
        up = run(
            [QUORUM, "up", *base, "--governance", str(governance), "--prefect-file", str(tmp_path / "prefect.yaml")]
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"serving alpha: http://127.0.0.1:{serve_port}" in up.stdout
        deadline = time.monotonic() + 600  # the site worker starts the flow run, which imports and binds
        while health_line(serve_port) == "not answering" and time.monotonic() < deadline:
            time.sleep(1)
        status = run([QUORUM, "status", *base, "--governance", str(governance)])
    finally:
        down = run([QUORUM, "down", *base])

    assert health_line(serve_port) == "not answering"
    assert "serve alpha" in status.stdout and f"http://127.0.0.1:{serve_port}" in status.stdout, status.stdout
    assert "no verified champion loaded yet (503)" in status.stdout  # nothing promoted: it waits, answering 503
    assert down.returncode == 0 and "serve-alpha" in down.stdout, down.stdout + down.stderr
