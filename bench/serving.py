"""Serving benchmark: the site service beside plain torch, a bare ONNX Runtime session and `mlflow models serve`.

A tiny federation (3 sites, 2 rounds, the demo's hidden sizes 32-16) runs one lifecycle in a temp
folder; its v1 champion (torch files plus the signed ONNX and int8 variants) is then timed, in the
same run and on the same rows (complete raw rows of site alpha), by:

- ``torch forward``: the plain torch module on the prepared matrix (``torch.no_grad``);
- ``bare ORT``: an ONNX Runtime session on the prepared matrix (the fp32 variant, 1 thread);
- ``service scorer``: what the service calls per request once rows are checked (the same session
  behind its wrapper), and ``service in-process``: ``ModelService.predict`` on the JSON body (parse,
  PII/column checks, feature processing, routing, scoring, counters), sent as row objects and, as
  ``(cols)``, as one list per column;
- ``service HTTP``: ``quorum serve`` (the same service) over one keep-alive loopback connection, both
  body shapes; every body is encoded once, before its loop (the client's encoding is not timed);
- ``mlflow models serve``: the same registered version (``--env-manager local``), its
  ``/invocations`` over one keep-alive connection, sent the prepared matrix (it takes no raw rows).

Sequential requests, one client; single rows and 256-row batches; p50/p99 of the per-request wall
time, throughput in rows/s, ratio = throughput / bare ORT. Every loop is bounded; servers listen on
127.0.0.1 only.

    .venv/bin/python bench/serving.py [--single 300] [--batched 100] [--skip-mlflow]

Prints figures only; timings are never asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="quorum-bench-serving-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")  # a busy machine starts it slowly

BATCH = 256
MLFLOW_START_S = 300  # the longest wait for `mlflow models serve` to answer /ping


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(action: Callable[[], object], requests: int) -> list[float]:
    action()  # warm up once, untimed
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Client:
    """One keep-alive HTTP connection; raises on any answer but 200."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def _send(self, path: str, body: bytes) -> http.client.HTTPResponse:
        self.connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        return self.connection.getresponse()

    def post(self, path: str, body: bytes) -> bytes:
        try:
            response = self._send(path, body)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            self.connection.close()  # the server closed an idle keep-alive connection: open a new one
            response = self._send(path, body)
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path} answered {response.status}: {data[:200]!r}")
        return data


def build_federation() -> tuple[Path, Path]:
    from quorum.flows.lifecycle import lifecycle
    from tests.federation import pin_governance_root, write_federation, write_governance

    root = WORK / "federation"
    root.mkdir()
    config_path = write_federation(root, rounds=2, extra={"model": {"hidden_sizes": [32, 16]}})
    governance_path, keys = write_governance(root)
    pin_governance_root(config_path, governance_path)
    result = lifecycle(str(config_path), str(governance_path), keys[:2])
    assert result.promotion is not None and result.promotion.champion, "the bench federation promoted nothing"
    return config_path, governance_path


def start_mlflow(tracking_uri: str, model_uri: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    # mlflow starts `uvicorn` by name: the venv's bin folder must be on PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["--host", "127.0.0.1", "-p", str(port)]
    log = (WORK / "mlflow-serve.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + MLFLOW_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (WORK / "mlflow-serve.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow models serve exited:\n{tail}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(1.0)
    process.kill()
    raise RuntimeError(f"mlflow models serve did not answer /ping within {MLFLOW_START_S} s")


def main() -> None:
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--single", type=int, default=300, help="requests of one row per contender")
    parser.add_argument("--batched", type=int, default=100, help="requests of 256 rows per contender")
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument(
        "--federation",
        type=Path,
        help="a folder holding federation.yaml and governance.yaml with a promoted v1 (copied first; "
        "default: build one with a lifecycle run)",
    )
    args = parser.parse_args()
    try:
        run(args.single, args.batched, not args.skip_mlflow, args.federation)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


def run(single: int, batched: int, with_mlflow: bool, federation: Path | None) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from quorum.flows.context import load_context
    from quorum.flows.deploy import load_site_context
    from quorum.flows.serving import start_service
    from quorum.lineage.registry import load_weights, model_key
    from quorum.tasks.model import model_from_weights
    from quorum.tasks.scoring import onnx_session

    if federation is None:
        print("building a 3-site federation and promoting v1 (one lifecycle) ...", flush=True)
        config_path, governance_path = build_federation()
    else:
        shutil.copytree(federation, WORK / "federation")
        config_path, governance_path = WORK / "federation" / "federation.yaml", WORK / "federation" / "governance.yaml"
    ctx = load_context(str(config_path), str(governance_path))
    config = ctx.config
    files = ctx.store.checkout(model_key(config.model_name, "1"))
    site_ctx = load_site_context(str(config_path), str(governance_path), "alpha")  # as the site serves: no MLflow
    running = start_service(site_ctx, "alpha", port=free_port(), runtime="onnx")
    service = running.service
    champion = service.champion
    assert champion is not None
    columns = list(config.features.columns)
    raw = pd.read_csv(config.site("alpha").data_path).dropna(subset=columns)
    raw = pd.concat([raw] * (BATCH // len(raw) + 1)).head(BATCH)
    rows = [
        {c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()} for row in raw[columns].to_dict("records")
    ]
    from quorum.tasks.serving_rows import rows_to_matrix

    matrix = rows_to_matrix(rows, champion.schema)
    torch.set_num_threads(1)  # the same single thread as the ONNX sessions
    model = model_from_weights(load_weights(files), config.model.hidden_sizes)
    session = onnx_session(files / "onnx" / "model.onnx")
    scorer = champion.scorer
    http_client = Client(running.server.server_address[1])

    def torch_forward(x: Any) -> Callable[[], object]:
        tensor = torch.from_numpy(x)

        def forward() -> object:
            with torch.no_grad():
                return torch.sigmoid(model(tensor))

        return forward

    contenders: dict[str, Callable[[Any, list[dict[str, object]]], Callable[[], object]]] = {
        "bare ORT": lambda x, r: lambda: session.run(None, {"features": x}),
        "torch forward": lambda x, r: torch_forward(x),
        "service scorer (ORT)": lambda x, r: lambda: scorer.predict(x),
        "service in-process": lambda x, r: partial(service.predict, rows_body(r)),
        "service in-process (cols)": lambda x, r: partial(service.predict, columns_body(r)),
        "service HTTP": lambda x, r: partial(http_client.post, "/predict", rows_body(r)),
        "service HTTP (cols)": lambda x, r: partial(http_client.post, "/predict", columns_body(r)),
    }
    mlflow_process = None
    if with_mlflow:
        print("starting mlflow models serve on the same registered version ...", flush=True)
        mlflow_process, port = start_mlflow(ctx.tracker.uri, f"models:/{config.model_name}/1")
        mlflow_client = Client(port)
        contenders["mlflow models serve"] = lambda x, r: partial(
            mlflow_client.post, "/invocations", json.dumps({"inputs": x.tolist()}).encode()
        )
    try:
        for size, requests in ((1, single), (BATCH, batched)):
            x, r = np.ascontiguousarray(matrix[:size]), rows[:size]
            print(f"\n{size}-row requests, {requests} sequential requests each, one client")
            print(f"    {'contender':<26} {'p50 ms':>9} {'p99 ms':>9} {'rows/s':>11} {'vs bare ORT':>12}")
            baseline = 0.0
            for name, make in contenders.items():
                times = measure(make(x, r), requests)
                baseline = baseline or size / statistics.median(times)  # bare ORT is measured first
                report(name, size, times, baseline)
    finally:
        running.stop()
        if mlflow_process is not None:
            mlflow_process.terminate()
            mlflow_process.wait(timeout=60)


def rows_body(rows: list[dict[str, object]]) -> bytes:
    """``{"rows": [...]}``, encoded once outside the timed loop: a client's own encoding is not the service's cost."""
    return json.dumps({"rows": rows}).encode()


def columns_body(rows: list[dict[str, object]]) -> bytes:
    """The same rows as ``{"columns": {name: [values]}}``, the batch shape the service parses fastest."""
    return json.dumps({"columns": {c: [row[c] for row in rows] for c in rows[0]}}).encode()


def report(name: str, size: int, times: list[float], baseline: float) -> None:
    rate = size / statistics.median(times)
    p50, p99 = percentile(times, 0.50) * 1e3, percentile(times, 0.99) * 1e3
    print(f"    {name:<26} {p50:>9.3f} {p99:>9.3f} {rate:>11.0f} {rate / baseline:>11.2f}x", flush=True)


if __name__ == "__main__":
    main()
