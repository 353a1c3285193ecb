"""``quorum up`` / ``status`` / ``down``: the local Prefect server, MLflow server, pools and workers.

Every process started here is recorded by pid (and its log) under ``STATE/services``; ``down``
stops exactly those process groups and nothing else. Each site worker runs in its own process
group, in the site's own folder, with an environment that names only that site's data root.

``up`` overlaps what can overlap: one worker host (``worker_host.py``) imports Prefect once while
the servers start and forks every worker as soon as the Prefect API answers; the pools and
deployments are applied through the API in this process meanwhile, and readiness is one API call per
poll. ``down`` signals every group at once and waits for them together.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from quorum.configs.errors import QuorumError, ToolError
from quorum.configs.schema import FederationConfig, expand_secrets
from quorum.configs.site_pins import site_pins
from quorum.infra.capacity import apply_site_concurrency
from quorum.infra.deployments import COORDINATOR_POOL, PreparedDeployment, apply, prepare, site_pool
from quorum.infra.start_run import STARTER_ENV, socket_path
from quorum.lineage.state import SITE_ROOT_ENV, StateLayout

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

HOST = "127.0.0.1"
WORKER_HEARTBEAT_S = 10  # a worker beats this often; three missed beats and its site counts as absent
SCHEDULED_RUNS = 3  # upcoming runs the Prefect scheduler keeps per schedule
SQLITE_BUSY_S = 30  # how long the Prefect server waits for SQLite's write lock (its default 10 s fails under load)
STARTER = "site-starter"  # the service that forks site flow runs with their modules already imported
READY_TIMEOUT_S = 600.0  # for the whole of `quorum up`: a loaded 2-core machine needs minutes, an idle one seconds


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
    def __init__(
        self,
        config: FederationConfig,
        state: StateLayout,
        database: str | None = None,
        *,
        governance_path: Path | None = None,
    ) -> None:
        """``governance_path``: the governance the site workers this stack starts are pinned to, with the
        config's own file (``quorum.configs.site_pins``); without it they are pinned to nothing."""
        self.config = config
        self.state = state
        self.governance_path = governance_path
        self.folder = state.root / "services"
        self.prefect_url = f"http://{HOST}:{config.deployment.prefect_port}/api"
        self.mlflow_url = f"http://{HOST}:{config.deployment.mlflow_port}"
        self.database = database or config.deployment.prefect_database

    def service(self, name: str) -> Service:
        return Service(name, self.folder / f"{name}.pid", self.folder / f"{name}.log")

    def services(self) -> list[Service]:
        names = ["prefect-server", "mlflow-server", STARTER, f"worker-{COORDINATOR_POOL}"]
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
            PREFECT_WORKER_QUERY_SECONDS="3",
            PREFECT_WORKER_HEARTBEAT_SECONDS=str(WORKER_HEARTBEAT_S),
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
        """Only this site's data root and, if configured, its own credentials file: nothing of the coordinator's.

        Also the config and governance files its flow runs must name, when the stack knows its governance.
        """
        site = self.config.site(site_id)
        env = {**self.base_env(), SITE_ROOT_ENV: str(site.root), STARTER_ENV: str(self.starter_socket)}
        if self.governance_path is not None and self.config.source is not None:
            env.update(site_pins(self.config.source, self.governance_path))
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
        # uvicorn kills a worker that has not answered its health check within 5 s: on a loaded machine one
        # still importing MLflow then, so workers were killed and restarted for ever and MLflow never came up
        command += ["--workers", str(deployment.mlflow_workers), "--uvicorn-opts=--timeout-worker-healthcheck 300"]
        # MLflow 3's server also starts a pool of job runners (huey consumers, several processes) that Quorum
        # never uses: on 2 cores they cost a core during start-up and outlived a killed server
        jobs_off = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        return command, {**self.coordinator_env(), "MLFLOW_BACKEND_STORE_URI": backend, **jobs_off}

    def start_servers(self) -> None:
        """Start both servers and wait until both answer."""
        self.launch_servers()
        self.wait_prefect()
        self.wait_mlflow()

    def launch_servers(self) -> None:
        """Start the Prefect and MLflow servers without waiting for them."""
        bin_dir = Path(sys.executable).parent
        port = str(self.config.deployment.prefect_port)
        # no block types are used: registering Prefect's catalogue of them costs seconds at every first start
        server_env = {
            **self.base_env(),
            "PREFECT_UI_API_URL": self.prefect_url,
            "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
            # a few upcoming runs per schedule, not Prefect's 100: at up, 100 hourly monitor runs per site
            # were hundreds of inserts competing with the workers' first heartbeats
            "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": str(SCHEDULED_RUNS),
        }
        server_env.pop("PREFECT_API_URL")
        if self.database:
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = prefect_database_url(
                expand_secrets(self.database, "deployment.prefect_database")
            )
        else:  # one SQLite file takes every worker's heartbeats and every flow run's state
            server_env["PREFECT_SERVER_DATABASE_TIMEOUT"] = str(SQLITE_BUSY_S)
        _require_free(self.config.deployment.prefect_port, self.service("prefect-server"))
        _require_free(self.config.deployment.mlflow_port, self.service("mlflow-server"))
        self._start(
            "prefect-server",
            [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", port],
            server_env,
            self.state.root,
        )
        self._start("mlflow-server", *self.mlflow_server(), self.state.root)
        self.write_endpoints()

    def wait_prefect(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        _wait_http(f"{self.prefect_url}/health", "Prefect server", self.service("prefect-server"), timeout_s)

    def wait_mlflow(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        _wait_http(f"{self.mlflow_url}/health", "MLflow server", self.service("mlflow-server"), timeout_s)

    def up(
        self,
        project: Path,
        prefect_file: Path,
        site_workers: bool = True,
        render: Callable[[], object] | None = None,
    ) -> dict[str, float]:
        """Servers, storage, pools, workers and deployments, overlapped; returns seconds since start per step.

        ``render`` writes ``prefect_file`` when it is missing (after the servers' settings were checked).
        """
        timings: dict[str, float] = {}
        started = time.monotonic()

        def mark(step: str) -> None:
            timings[step] = round(time.monotonic() - started, 2)

        def left() -> float:  # one deadline for the whole start-up, counted from the launch
            return max(1.0, READY_TIMEOUT_S - (time.monotonic() - started))

        self.launch_servers()
        host = self.launch_workers()  # imports Prefect's worker while the servers start
        if render is not None and not prefect_file.exists():
            render()
        prepared = self.prepare_deployments(prefect_file, project)  # reads the flows' source meanwhile too
        self.wait_prefect(left())
        mark("prefect_api")
        pools = self.ensure_pools()
        self.apply_deployments(prepared)  # before the workers' first writes compete for SQLite's lock
        mark("deployed")
        self.release_workers(host, project, site_workers, left())
        mark("workers_started")
        self.prepare_storage()
        self.wait_mlflow(left())
        mark("mlflow_api")
        self.wait_for_workers(pools if site_workers else [COORDINATOR_POOL], timeout_s=left())
        mark("workers_ready")
        if site_workers:
            # its imports (8-12 s of CPU) are needed by the first site run, not by anything above:
            # a run handed to it meanwhile waits for them, as it would have imported them itself
            self.launch_starter()
        return timings

    def deploy(self, prefect_file: Path, project: Path) -> list[str]:
        """Every deployment of ``prefect_file``, created or updated through the API in one pass."""
        return self.apply_deployments(self.prepare_deployments(prefect_file, project))

    def prepare_deployments(self, prefect_file: Path, project: Path) -> list[PreparedDeployment]:
        """The deployments of ``prefect_file`` with their flows' schemas: no server needed."""
        try:
            document = yaml.safe_load(prefect_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ToolError(f"cannot read {prefect_file}: {exc}", fix="run `quorum infra render`") from exc
        if not isinstance(document, dict):
            raise ToolError(f"{prefect_file} is not a prefect.yaml document", fix="run `quorum infra render`")
        return prepare(document, project.resolve())

    def apply_deployments(self, prepared: list[PreparedDeployment]) -> list[str]:
        import httpx

        try:
            with self.client() as client:
                return apply(prepared, client)
        except httpx.HTTPError as exc:  # Prefect's status errors derive from it
            raise ToolError(
                f"the Prefect server refused the deployments: {exc}",
                fix=f"see {self.service('prefect-server').log_file}, then run `quorum up` again",
            ) from None

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
        """Start the workers (the Prefect API must be up or coming) and return once each has a pid."""
        if site_workers:
            self.launch_starter()
        self.release_workers(self.launch_workers(), project, site_workers, READY_TIMEOUT_S)

    def launch_workers(self) -> subprocess.Popen[bytes]:
        """Start the worker host (``quorum.infra.worker_host``): it imports Prefect's process worker once,
        then waits for ``release_workers`` to name the workers it forks."""
        self.folder.mkdir(parents=True, exist_ok=True)
        header = {"health_url": f"{self.prefect_url}/health", "timeout_s": READY_TIMEOUT_S}
        with open(self.service("worker-host").log_file, "ab") as log:
            host = subprocess.Popen(
                [sys.executable, "-m", "quorum.infra.worker_host"],
                cwd=self.state.root,
                env=self.base_env(),  # what every worker shares: no site's data root, no credentials
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        assert host.stdin is not None
        host.stdin.write(json.dumps(header).encode() + b"\n")
        host.stdin.flush()
        return host

    @property
    def starter_socket(self) -> Path:
        return socket_path(self.state.root)

    def launch_starter(self) -> Service:
        """Start the site run starter (``quorum.infra.run_starter``) unless it runs.

        It imports the site runs' modules once and forks every site flow run from there; a site
        worker finds it through ``QUORUM_RUN_STARTER`` in its environment. It gets the environment
        every worker shares, never a site's data root or anybody's credentials.
        """
        return self._start(
            STARTER,
            [sys.executable, "-m", "quorum.infra.run_starter", str(self.starter_socket)],
            self.base_env(),
            self.state.root,
        )

    def release_workers(
        self, host: subprocess.Popen[bytes], project: Path, site_workers: bool, timeout_s: float
    ) -> None:
        """Have the host fork every worker not already running, and wait until it has (it exits then).

        Each worker is a process group of its own, in its own folder, with the host's environment plus
        its own: a site's data root and credentials file, or the coordinator's credentials. Site
        workers are sent first and the coordinator last, so no site worker ever holds its credentials.
        """
        base = self.base_env()
        workers: list[tuple[str, str, dict[str, str], Path]] = []
        for site in self.config.sites if site_workers else ():
            site.root.mkdir(parents=True, exist_ok=True)
            workers.append((f"worker-{site.id}", site_pool(site.id), self.site_env(site.id), site.root))
        coordinator = {**self.coordinator_env(), "QUORUM_PROJECT": str(project)}
        workers.append((f"worker-{COORDINATOR_POOL}", COORDINATOR_POOL, coordinator, project))
        lines = [
            {
                "pool": pool,
                "cwd": str(cwd),
                "env": {key: value for key, value in env.items() if base.get(key) != value},
                "log": str(self.service(name).log_file),
                "pid_file": str(self.service(name).pid_file),
                "heartbeat_s": WORKER_HEARTBEAT_S,
            }
            for name, pool, env, cwd in workers
            if not self.service(name).alive()
        ]
        assert host.stdin is not None
        log = self.service("worker-host").log_file
        with contextlib.suppress(BrokenPipeError):  # a host that already failed says why in its log
            host.stdin.write("".join(json.dumps(line) + "\n" for line in lines).encode())
            host.stdin.close()
        try:
            code = host.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()
            raise ToolError(f"the workers did not start within {timeout_s:.0f}s", fix=f"see {log}") from None
        if code != 0:
            raise ToolError(f"the worker host exited with code {code} before starting every worker", fix=f"see {log}")

    def stop(self) -> list[str]:
        """Signal every recorded process group at once, then wait for all of them together."""
        running = {s.name: pid for s in reversed(self.services()) if (pid := s.pid()) is not None and s.alive()}
        _stop_groups(list(running.values()))
        for service in self.services():
            service.pid_file.unlink(missing_ok=True)
        self.starter_socket.unlink(missing_ok=True)
        return list(running)

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        """A client of this stack's server, whatever API this process was configured with before."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.prefect_url}), get_client(sync_client=True) as client:
            yield client

    def pool_names(self) -> list[str]:
        return [COORDINATOR_POOL, *(site_pool(s) for s in self.config.site_ids)]

    def ensure_pools(self) -> list[str]:
        """One process work pool per site plus the coordinator's; existing pools are kept as they are.

        Each is created with the process worker's job template, so no worker has to write it when it
        starts: with SQLite, many workers writing at once wait on each other's locks.
        """
        import httpx
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists
        from prefect.workers.process import ProcessWorker

        names = self.pool_names()
        template = ProcessWorker.get_default_base_job_template()
        try:
            with self.client() as client:
                for name in names:
                    with contextlib.suppress(ObjectAlreadyExists):
                        client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
                apply_site_concurrency(client, self.config)  # sites.ID.concurrency: jobs beyond it queue
        except httpx.HTTPError as exc:
            raise ToolError(
                f"the Prefect server refused the work pools: {exc}",
                fix=f"see {self.service('prefect-server').log_file}, then run `quorum up` again",
            ) from None
        return names

    def wait_for_workers(self, pools: list[str], timeout_s: float) -> dict[str, str]:
        """Wait until every pool reports READY (a live worker polls it): one API call per poll."""
        from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

        deadline = time.monotonic() + timeout_s
        statuses: dict[str, str] = {name: "missing" for name in pools}
        wanted = WorkPoolFilter(name=WorkPoolFilterName(any_=list(pools)))
        import httpx

        with self.client() as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):  # a busy server answers 503 now and then: ask again
                    found = client.read_work_pools(work_pool_filter=wanted, limit=len(pools))
                    statuses.update({pool.name: str(getattr(pool.status, "value", "")) for pool in found})
                if all(status == "READY" for status in statuses.values()):
                    return statuses
                time.sleep(0.5)
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


def _group_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # reap the leader if this process started it (tests, benches)
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a reused pid in someone else's group: not ours any more
        return False
    return True


def _stop_groups(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM every group, wait up to ``grace_s`` for all of them together, SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    left = [pid for pid in pids if _group_alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [pid for pid in left if _group_alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
