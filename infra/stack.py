"""``quorum up`` / ``status`` / ``down``: the local Prefect server, MLflow server, pools and workers.

Every process started here is recorded by pid (and its log) under ``STATE/services``; ``down``
stops exactly those process groups and nothing else. Each site worker runs in its own process
group, in the site's own folder, with an environment that names only that site's data root.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from quorum.configs.errors import QuorumError, ToolError
from quorum.configs.schema import FederationConfig, expand_secrets
from quorum.infra.capacity import apply_site_concurrency
from quorum.infra.deployments import COORDINATOR_POOL, site_pool
from quorum.lineage.state import SITE_ROOT_ENV, StateLayout

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Service:
    name: str
    pid_file: Path
    log_file: Path

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


# what a process may need to reach S3 as the coordinator; a site worker never inherits these
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")
_AWS_FILES = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_PROFILE")


def prefect_database_url(url: str) -> str:
    """Prefect's server talks to PostgreSQL through asyncpg; users write the plain URL."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+asyncpg://" + url.removeprefix(plain)
    return url


class Stack:
    def __init__(self, config: FederationConfig, state: StateLayout, database: str | None = None) -> None:
        self.config = config
        self.state = state
        self.folder = state.root / "services"
        self.prefect_url = f"http://{HOST}:{config.deployment.prefect_port}/api"
        self.mlflow_url = f"http://{HOST}:{config.deployment.mlflow_port}"
        self.database = database or config.deployment.prefect_database

    def service(self, name: str) -> Service:
        return Service(name, self.folder / f"{name}.pid", self.folder / f"{name}.log")

    def services(self) -> list[Service]:
        names = ["prefect-server", "mlflow-server", f"worker-{COORDINATOR_POOL}"]
        return [self.service(n) for n in names + [f"worker-{s}" for s in self.config.site_ids]]

    def write_endpoints(self) -> None:
        (self.folder / "endpoints.json").write_text(
            json.dumps({"prefect_api_url": self.prefect_url, "mlflow_tracking_uri": self.mlflow_url})
        )

    def _start(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> Service:
        service = self.service(name)
        if service.alive():
            return service
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(service.log_file, "ab") as log:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        service.pid_file.write_text(str(process.pid))
        return service

    def base_env(self) -> dict[str, str]:
        """What every service needs, and no site's data location."""
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(
            PREFECT_HOME=str(self.state.prefect_home),
            PREFECT_API_URL=self.prefect_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1",
            MLFLOW_TRACKING_URI=self.mlflow_url,
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
            GX_ANALYTICS_ENABLED="False",
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_LOGGING_LEVEL="INFO",
        )
        return env

    def coordinator_env(self) -> dict[str, str]:
        """The coordinator side (servers, coordinator worker) also gets this shell's S3 credentials."""
        env = self.base_env()
        env.update({k: v for k, v in os.environ.items() if k in _AWS_ENV + _AWS_FILES})
        if self.config.storage.endpoint_url:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.config.storage.endpoint_url
        return env

    def site_env(self, site_id: str) -> dict[str, str]:
        """Only this site's data root and, if configured, its own credentials file: nothing of the coordinator's."""
        site = self.config.site(site_id)
        env = {**self.base_env(), SITE_ROOT_ENV: str(site.root)}
        env.update({k: v for k, v in os.environ.items() if k in ("AWS_DEFAULT_REGION", "AWS_REGION")})
        if site.aws_credentials_file is not None:
            env["AWS_SHARED_CREDENTIALS_FILE"] = str(site.aws_credentials_file)
        return env

    def mlflow_server(self) -> tuple[list[str], dict[str, str]]:
        """MLflow's command and environment: its configured database and artifact location.

        SQLite and a folder by default. Artifacts are served through the MLflow server
        (``--artifacts-destination``), so clients need no S3 credentials of their own to log or
        fetch a model. The database URL travels in the environment, not the command line, where
        any local user could read its password with ``ps``.
        """
        deployment = self.config.deployment
        backend = (
            expand_secrets(deployment.mlflow_database, "deployment.mlflow_database")
            if deployment.mlflow_database
            else self.state.tracking_uri
        )
        artifacts = deployment.mlflow_artifacts or self.state.mlflow_artifacts.resolve().as_uri()
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", HOST]
        command += ["--port", str(deployment.mlflow_port), "--artifacts-destination", artifacts]
        return command, {**self.coordinator_env(), "MLFLOW_BACKEND_STORE_URI": backend}

    def start_servers(self) -> None:
        bin_dir = Path(sys.executable).parent
        port = str(self.config.deployment.prefect_port)
        server_env = {**self.base_env(), "PREFECT_UI_API_URL": self.prefect_url}
        server_env.pop("PREFECT_API_URL")
        if self.database:
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = prefect_database_url(
                expand_secrets(self.database, "deployment.prefect_database")
            )
        _require_free(self.config.deployment.prefect_port, self.service("prefect-server"))
        _require_free(self.config.deployment.mlflow_port, self.service("mlflow-server"))
        self._start(
            "prefect-server",
            [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", port],
            server_env,
            self.state.root,
        )
        self._start("mlflow-server", *self.mlflow_server(), self.state.root)
        _wait_http(f"{self.prefect_url}/health", "Prefect server", self.service("prefect-server"), 120)
        _wait_http(f"{self.mlflow_url}/health", "MLflow server", self.service("mlflow-server"), 120)
        self.write_endpoints()

    def prepare_storage(self) -> None:
        """Check the S3 artifact store answers before any job relies on it; create its bucket if missing.

        Creating the bucket suits MinIO or a test server; on AWS the operator creates buckets and
        their policies, and this only confirms the coordinator's credentials reach it.
        """
        if self.config.storage.artifacts is None:
            return
        from quorum.lineage.artifacts import federation_store
        from quorum.lineage.s3_store import S3ArtifactStore

        store = federation_store(self.config)
        assert isinstance(store, S3ArtifactStore)
        store.ensure_bucket()

    def start_workers(self, project: Path, site_workers: bool = True) -> None:
        prefect = str(Path(sys.executable).parent / "prefect")
        env = {**self.coordinator_env(), "QUORUM_PROJECT": str(project)}
        self._start(
            f"worker-{COORDINATOR_POOL}",
            [prefect, "worker", "start", "--pool", COORDINATOR_POOL, "--type", "process"],
            env,
            project,
        )
        for site in self.config.sites if site_workers else ():
            site_env = self.site_env(site.id)
            site.root.mkdir(parents=True, exist_ok=True)
            self._start(
                f"worker-{site.id}",
                [prefect, "worker", "start", "--pool", site_pool(site.id), "--type", "process"],
                site_env,
                site.root,
            )

    def stop(self) -> list[str]:
        stopped = []
        for service in reversed(self.services()):
            pid = service.pid()
            if pid is not None and service.alive():
                _stop_group(pid)
                stopped.append(service.name)
            service.pid_file.unlink(missing_ok=True)
        return stopped

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """A client of this stack's server, whatever API this process was configured with before."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.prefect_url}), get_client(sync_client=True) as client:
            yield client

    def ensure_pools(self) -> list[str]:
        """One process work pool per site plus the coordinator's; existing pools are kept as they are."""
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists

        names = [COORDINATOR_POOL, *(site_pool(s) for s in self.config.site_ids)]
        with self.client() as client:
            for name in names:
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            apply_site_concurrency(client, self.config)  # sites.ID.concurrency: jobs beyond it queue
        return names

    def wait_for_workers(self, pools: list[str], timeout_s: float) -> dict[str, str]:
        """Wait until every pool reports READY (a live worker polls it)."""
        deadline = time.monotonic() + timeout_s
        statuses: dict[str, str] = {}
        with self.client() as client:
            while time.monotonic() < deadline:
                statuses = {name: str(getattr(client.read_work_pool(name).status, "value", "")) for name in pools}
                if all(status == "READY" for status in statuses.values()):
                    return statuses
                time.sleep(1)
        waiting = ", ".join(name for name, status in statuses.items() if status != "READY")
        raise ToolError(
            f"no live worker on pool(s) {waiting} after {timeout_s:.0f}s",
            fix=f"see the worker logs under {self.folder}",
        )

    def pool_report(
        self, pools: list[str], last_runs: int = 5
    ) -> tuple[dict[str, str], list[tuple[str, str, str, str]]]:
        """Pool statuses and the newest started flow runs (name, pool, state, start time)."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.exceptions import ObjectNotFound

        started = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])))
        with self.client() as client:
            statuses = {}
            for name in pools:
                try:
                    statuses[name] = str(getattr(client.read_work_pool(name).status, "value", "unknown"))
                except ObjectNotFound:
                    statuses[name] = "missing"
            runs = client.read_flow_runs(flow_run_filter=started, sort=FlowRunSort.START_TIME_DESC, limit=last_runs)
        rows = [(r.name, r.work_pool_name or "-", r.state_name or "-", str(r.start_time or "-")[:19]) for r in runs]
        return statuses, rows


def _require_free(port: int, owner: Service) -> None:
    if owner.alive():
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        if probe.connect_ex((HOST, port)) == 0:
            raise QuorumError(
                f"port {port} on {HOST} is already in use by another program",
                fix="stop that program, or set deployment.prefect_port / mlflow_port in the federation config",
            )


def _wait_http(url: str, what: str, service: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if not service.alive():
            raise ToolError(f"{what} exited while starting", fix=f"see its log: {service.log_file}")
        time.sleep(0.5)
    raise ToolError(f"{what} did not become healthy within {timeout_s:.0f}s", fix=f"see {service.log_file}")


def _stop_group(pid: int, grace_s: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def deploy(prefect_file: Path, project: Path, env: dict[str, str]) -> None:
    """``prefect deploy --all`` of the rendered file, so what runs is exactly what the file says."""
    prefect = str(Path(sys.executable).parent / "prefect")
    result = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
        cwd=project,
        env={**env, "QUORUM_PROJECT": str(project)},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise ToolError(f"prefect deploy failed for {prefect_file}:\n{tail}", fix="fix the file and run quorum up")
