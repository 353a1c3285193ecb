"""The temporary Prefect API of a command run without ``quorum up``, started before the rest loads.

Left to itself, Prefect starts a temporary API server inside the first flow call, after the command has
imported everything, and gives it 20 s. On a busy 2-core machine the server's own imports and, on a
federation's first run, the creation of its database take longer, and the run ends in a traceback.

Here the same server (uvicorn on Prefect's app factory, UI off, one free loopback port) is started as a
child process as soon as a command knows its state folder, so it comes up while torch, pandas and
Prefect's client load in this process. ``PREFECT_API_URL`` then names it before Prefect is imported,
so this process never imports Prefect's server code either. ``wait`` allows the start-up time in
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (``quorum.lineage.state`` sets 300 s unless the
user chose) and turns a server that never answers into an ``error:`` with a ``fix:``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from quorum.configs.errors import ToolError
from quorum.lineage.state import STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_S, StateLayout

HOST = "127.0.0.1"
POLL_S = 0.1
LOG_NAME = "temporary-api.log"
APP_FACTORY = "prefect.server.api.server:create_app"  # what Prefect's own temporary server runs


@dataclass
class TemporaryApi:
    """A Prefect API server this process started and stops when it exits."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    first_run: bool
    timeout_s: float
    started: float = field(default_factory=time.monotonic)
    ready: bool = False

    def wait(self) -> None:
        """Return once the server answers; raise ``ToolError`` if it exits or stays silent past the allowance."""
        while not self.ready:
            if _healthy(self.url):
                self.ready = True
                return
            code = self.process.poll()
            waited = time.monotonic() - self.started
            if code is not None or waited > self.timeout_s:
                self.stop()
                why = f"exited with code {code}" if code is not None else f"did not answer within {self.timeout_s:g} s"
                raise ToolError(
                    f"the temporary Prefect API for this run {why} (its log: {self.log})",
                    fix=f"run the command again (a first run also creates the database); on a busy machine allow "
                    f"more time with {STARTUP_TIMEOUT_ENV}=600, or start the servers once with `quorum up`",
                )
            time.sleep(POLL_S)

    def answers(self) -> bool:
        """Whether the server answers now: one health check, no waiting."""
        if not self.ready:
            self.ready = _healthy(self.url)
        return self.ready

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_started: dict[str, TemporaryApi] = {}  # the one server of this process, like Prefect's own


def start_temporary_api(state: StateLayout) -> TemporaryApi | None:
    """Start the server in the background, once per process; ``None`` when ``PREFECT_API_URL`` names one.

    Call it before Prefect is imported: Prefect reads ``PREFECT_API_URL`` once, at import.
    """
    if "url" in _started:
        return _started["url"]
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None  # a server is named, or Prefect has already read its settings (and starts its own)
    home = Path(os.environ.get("PREFECT_HOME") or state.prefect_home)
    home.mkdir(parents=True, exist_ok=True)
    first_run = not (home / "prefect.db").exists() and "PREFECT_API_DATABASE_CONNECTION_URL" not in os.environ
    port = _free_port()
    log = home / LOG_NAME
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "--app-dir", _prefect_parent(), "--factory", APP_FACTORY]
    command += ["--host", HOST, "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    api = TemporaryApi(process, f"http://{HOST}:{port}/api", log, first_run, startup_timeout_s())
    os.environ["PREFECT_API_URL"] = api.url
    atexit.register(api.stop)
    _started["url"] = api
    return api


def startup_timeout_s() -> float:
    try:
        return float(os.environ[STARTUP_TIMEOUT_ENV])
    except (KeyError, ValueError):
        return float(STARTUP_TIMEOUT_S)


def _prefect_parent() -> str:
    """The folder that holds the ``prefect`` package, found without importing it."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        raise ToolError("Prefect is not installed in this environment", fix="run `make setup`")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
