"""The sites' inference services under ``quorum up`` / ``status`` / ``down``: one ``serve-ID`` flow run per site.

With ``serving.start_with_up`` in the federation config, ``up`` starts each site's ``serve`` deployment
on that site's own pool (so the service runs where the site's data and verified copy are), on the
site's loopback port (``FederationConfig.serving_port``), waiting for a champion when none is
promoted yet. The flow run ids and ports go to ``STATE/services/serving.json``. ``status`` shows
each service's URL, flow run state and what its health endpoint says; ``down`` cancels the flow
runs through Prefect and, if a service still answers, stops the process its flow run recorded at
the site (``deployed/serving/service.json``, matched by flow run id) and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quorum.configs.errors import QuorumError
from quorum.configs.schema import FederationConfig

if TYPE_CHECKING:
    from quorum.infra.stack import Stack

HOST = "127.0.0.1"
RECORD = "serving.json"
STOP_TIMEOUT_S = 30.0  # for a cancelled serve flow run's process to let go of its port


def serve_deployment(site_id: str) -> str:
    return f"serve/serve-{site_id}"


@dataclass(frozen=True)
class SiteService:
    site_id: str
    port: int
    flow_run_id: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def read_services(stack: Stack) -> list[SiteService]:
    path = stack.folder / RECORD
    if not path.is_file():
        return []
    data: Any = json.loads(path.read_text())
    return [SiteService(str(s["site_id"]), int(s["port"]), str(s["flow_run_id"])) for s in data["services"]]


def _write_services(stack: Stack, services: list[SiteService]) -> None:
    stack.folder.mkdir(parents=True, exist_ok=True)
    payload = {"services": [{"site_id": s.site_id, "port": s.port, "flow_run_id": s.flow_run_id} for s in services]}
    (stack.folder / RECORD).write_text(json.dumps(payload, indent=2) + "\n")


def port_answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((HOST, port)) == 0


def require_free_port(site_id: str, port: int) -> None:
    if port_answers(port):
        raise QuorumError(
            f"the serving port {port} of site {site_id} on {HOST} is already in use by another program",
            fix=f"stop that program, or give the site another port (serving.ports.{site_id} in the federation config)",
        )


def start_serving(stack: Stack, config: FederationConfig) -> list[SiteService]:
    """Start each site's serve flow run (``serving.start_with_up``); a recorded run still active is kept."""
    if not config.serving.start_with_up:
        return []
    recorded = {s.site_id: s for s in read_services(stack)}
    services: list[SiteService] = []
    with stack.client() as client:
        active = {
            s.site_id
            for s in recorded.values()
            if _run_state(client, s.flow_run_id) in ("SCHEDULED", "PENDING", "RUNNING")
        }
    for site in config.sites:
        if site.id in active:
            services.append(recorded[site.id])
            continue
        port = config.serving_port(site.id)
        require_free_port(site.id, port)
        services.append(SiteService(site.id, port, _start_run(stack, site.id, port)))
        _write_services(stack, services)
    _write_services(stack, services)
    return services


def _start_run(stack: Stack, site_id: str, port: int) -> str:
    """The flow run id of the site's new serve run, waiting for a champion on ``port``."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: stack.prefect_url}):
            run = run_deployment(
                serve_deployment(site_id),
                parameters={"port": port, "wait_for_champion": True},
                timeout=0,
                tags=["quorum-up", "serving"],
            )
    except ObjectNotFound:
        raise QuorumError(
            f"site {site_id} has no serve deployment ({serve_deployment(site_id)})",
            fix="render the deployments again (`quorum infra render`), then run `quorum up` again",
        ) from None
    return str(run.id)  # type: ignore[union-attr]  # the sync call returns a FlowRun


def _run_state(client: Any, flow_run_id: str) -> str:
    from uuid import UUID

    import httpx
    from prefect.exceptions import ObjectNotFound

    try:
        run = client.read_flow_run(UUID(flow_run_id))
    except (ObjectNotFound, httpx.HTTPError, ValueError):
        return "unknown"
    return str(getattr(run.state_type, "value", "unknown"))


def health_line(port: int) -> str:
    """What a service's ``/health`` says, in a few words (never a request value: it holds none)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as response:
            payload: Any = json.loads(response.read())
    except urllib.error.HTTPError as error:
        return "no verified champion loaded yet (503)" if error.code == 503 else f"health answered {error.code}"
    except (OSError, ValueError):
        return "not answering"
    champion = payload.get("champion") or {}
    return (
        f"{payload.get('model')} v{champion.get('version')} ({champion.get('runtime')}, policy {payload.get('policy')})"
    )


def serving_status(stack: Stack) -> list[str]:
    """One line per recorded service: site, URL, flow run state, health."""
    services = read_services(stack)
    if not services:
        return []
    with stack.client() as client:
        states = {s.site_id: _run_state(client, s.flow_run_id) for s in services}
    return [f"serve {s.site_id:<18} {s.url:<24} {states[s.site_id]:<10} {health_line(s.port)}" for s in services]


def stop_serving(stack: Stack, prefect_alive: bool) -> list[str]:
    """Cancel every recorded serve flow run, wait for its port to close, then stop a straggler by its pid."""
    services = read_services(stack)
    if not services:
        return []
    if prefect_alive:
        from uuid import UUID

        import httpx
        from prefect.states import Cancelling

        with stack.client() as client:
            for service in services:
                with contextlib.suppress(httpx.HTTPError, ValueError):  # already gone: the port check below decides
                    client.set_flow_run_state(UUID(service.flow_run_id), Cancelling(), force=True)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(port_answers(s.port) for s in services):
        time.sleep(0.5)
    for service in services:
        if port_answers(service.port):
            _stop_recorded_process(stack, service)
    (stack.folder / RECORD).unlink(missing_ok=True)
    return [f"serve-{s.site_id}" for s in services]


def _stop_recorded_process(stack: Stack, service: SiteService) -> None:
    """SIGTERM the process the site's serve flow recorded, only when it is this service's flow run."""
    from quorum.flows.serve import service_record

    record = service_record(stack.config.site(service.site_id).root)
    try:
        data: Any = json.loads(record.read_text())
    except (OSError, ValueError):
        return
    if data.get("flow_run_id") != service.flow_run_id or not isinstance(data.get("pid"), int):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(data["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and port_answers(service.port):
        time.sleep(0.2)
