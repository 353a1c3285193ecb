"""The site's inference service: the verified champion answering HTTP requests on 127.0.0.1.

The models and how they follow the artifact store are in ``serving_models``, the answers in
``serving_service``; this module is the HTTP face and the start and stop of the whole service.

Endpoints: ``POST /predict`` (``{"rows": [...]}`` or ``{"columns": {...}}`` in the site's raw
feature schema), ``GET /health`` and ``GET /metrics`` (Prometheus text). Neither the access log nor
any error repeats a value from a request.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from quorum.configs.errors import ChampionError, QuorumError, SignatureError
from quorum.flows.deploy import SiteContext
from quorum.flows.serving_service import ModelService, routing_key

__all__ = ["HOST", "ModelService", "RunningService", "routing_key", "start_service", "wait_for_interrupt"]

logger = logging.getLogger("quorum.serving")
HOST = "127.0.0.1"
MAX_BODY_BYTES = 64 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's next request skips the TCP handshake
    # headers and body go out in two writes: with Nagle's algorithm the second waits ~40 ms for the
    # client's delayed ACK of the first
    disable_nagle_algorithm = True
    server: ServingHTTPServer

    def do_GET(self) -> None:
        service = self.server.service
        if self.path == "/health":
            self._json(*service.health())
        elif self.path == "/metrics":
            self._send(200, service.metrics_text().encode(), "text/plain; version=0.0.4")
        else:
            self._json(404, {"error": "no such endpoint", "fix": "use POST /predict, GET /health or GET /metrics"})

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self.close_connection = True  # the body was not read: the connection cannot carry another request
            self._json(
                413 if length > MAX_BODY_BYTES else 411, {"error": "a JSON body with its Content-Length is needed"}
            )
            return
        body = self.rfile.read(length)
        if self.path != "/predict":
            self._json(404, {"error": "no such endpoint", "fix": "POST rows to /predict"})
            return
        try:
            self._json(*self.server.service.predict(body))
        except Exception as exc:  # a model failure answers 500 and is logged by type only: its text may hold values
            logger.error("%s: scoring failed (%s)", self.server.service.site.id, type(exc).__name__)
            self._json(500, {"error": "scoring failed", "fix": "see the service log"})

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, _dumps(payload), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Method, path and status only (the request line never carries row values: rows go in the body)."""
        logger.debug("%s %s", self.command, self.path)


def _dumps(payload: dict[str, Any]) -> bytes:
    """orjson when installed (Prefect depends on it): a 256-row answer encodes several times faster."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - installed with Prefect
        return json.dumps(payload).encode()
    return orjson.dumps(payload)


class ServingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: ModelService, port: int) -> None:
        super().__init__((HOST, port), _Handler)
        self.service = service

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A broken connection is logged by type only (the default prints a traceback)."""
        import sys

        logger.warning("%s: a connection failed (%s)", self.service.site.id, type(sys.exc_info()[1]).__name__)


@dataclass
class RunningService:
    """A started service: its HTTP server and the thread that follows the artifact store."""

    service: ModelService
    server: ServingHTTPServer
    stop_event: threading.Event
    threads: tuple[threading.Thread, ...]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.stop_event.set()
        self.server.shutdown()
        self.server.server_close()
        for thread in self.threads:
            thread.join()
        self.service.publish_routing()


def wait_for_interrupt(poll_s: float = 0.5) -> None:
    """Block the main thread until a signal's exception (Ctrl-C, a cancelled flow run) ends the wait.

    Never one unbounded wait: Python runs a signal's handler only in the main thread, once it runs
    again; should the signal land on another of the process's threads (the HTTP threads, ONNX
    Runtime's), a main thread parked in a lock without a timeout would not wake up for it. Waking every
    ``poll_s`` bounds that delay.
    """
    never = threading.Event()
    while not never.wait(poll_s):
        pass


def start_service(
    ctx: SiteContext,
    site_id: str,
    port: int | None = None,
    runtime: str | None = None,
    *,
    wait_for_champion: bool = False,
) -> RunningService:
    """Verify and load the champion, then answer on ``127.0.0.1:port`` (0: a free port) in background threads.

    ``port`` defaults to the site's ``serving_port``. Raises ``ChampionError`` or ``SignatureError``
    when no champion verifies: a service never starts without a model it can vouch for, unless
    ``wait_for_champion`` (``quorum up`` starts services before anything is promoted): it then answers
    503 until the follow loop has loaded a champion that verifies.
    """
    service = ModelService(ctx, site_id, runtime)
    service.refresh()
    if service.champion is None and not wait_for_champion:
        name = ctx.config.model_name
        refused = service.champion_refusal()
        if refused is None:
            raise ChampionError(f"{name} has no champion to serve", fix="promote a version first (`quorum approve`)")
        version, reason = refused
        what = f"the champion statement of {name}" if version == "statement" else f"champion {name} v{version}"
        raise SignatureError(
            f"{what} refused at site {site_id}: {reason}",
            fix="restore the version from a trusted copy or roll back (`quorum rollback`)",
        )
    chosen = ctx.config.serving_port(site_id) if port is None else port
    try:
        server = ServingHTTPServer(service, chosen)
    except OSError as exc:
        raise QuorumError(
            f"site {site_id} cannot listen on {HOST}:{chosen} ({exc.strerror or type(exc).__name__})",
            fix=f"stop the program holding that port, or choose another (--port, or serving.ports.{site_id})",
        ) from None
    stop = threading.Event()
    http = threading.Thread(target=server.serve_forever, name=f"serve-{site_id}", daemon=True)
    follow = threading.Thread(target=_follow_loop, args=(service, stop), name=f"follow-{site_id}", daemon=True)
    http.start()
    follow.start()
    return RunningService(service, server, stop, (http, follow))


def _follow_loop(service: ModelService, stop: threading.Event) -> None:
    """Poll the artifact store until stopped; a failed poll keeps the loaded models and is tried again."""
    while not stop.wait(service.serving.poll_interval_s):
        try:
            service.refresh()
            service.publish_routing()
        except QuorumError as error:
            logger.warning("%s: could not check the artifact store (%s); serving on", service.site.id, error.headline)
        except Exception as exc:  # the service must outlive a store hiccup; the type says what happened
            logger.warning(
                "%s: could not check the artifact store (%s); serving on", service.site.id, type(exc).__name__
            )
