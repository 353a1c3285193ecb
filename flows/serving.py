"""The site's inference service: the verified champion answering HTTP requests on 127.0.0.1.

``ModelService`` holds the loaded models and the counters; ``refresh`` follows the registry's
``champion`` (and, under a shadow or canary policy, ``candidate``) alias. A version is loaded only
after ``quorum.lineage.serving_trust.verify_for_serving`` passed on the site's own copy, and the
swap is one reference assignment: a request in flight finishes on the model it started with, and
the next one gets the new model, so no request is dropped. A version that fails verification is
refused into the audit log and the service keeps answering with the last verified model.

Endpoints: ``POST /predict`` (``{"rows": [...]}`` in the site's raw feature schema),
``GET /health`` and ``GET /metrics`` (Prometheus text). Neither the access log nor any error
repeats a value from a request.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from quorum.configs.errors import ChampionError, QuorumError, SignatureError
from quorum.configs.schema import GovernanceConfig
from quorum.flows.context import JobContext
from quorum.flows.deploy import trust_record
from quorum.lineage.champion import verified_champion
from quorum.lineage.governance_chain import trusted_governance
from quorum.lineage.registry import fetch_files
from quorum.lineage.serving_trust import Role, VerifiedVersion, verify_for_serving
from quorum.lineage.tracking import CANDIDATE, alias_version
from quorum.tasks.routing import RoutingCounts, agreements, route_request
from quorum.tasks.scoring import Scorer, load_scorer
from quorum.tasks.serving_rows import (
    RowRefused,
    RowSchema,
    check_columns,
    parse_body,
    row_schema,
    rows_to_matrix,
    training_fill,
)
from quorum.tasks.site import TRAIN_FILE

logger = logging.getLogger("quorum.serving")
SERVING_DIR = "deployed/serving"
HOST = "127.0.0.1"
MAX_BODY_BYTES = 64 * 1024 * 1024


def routing_key(site_id: str) -> str:
    """Where a site's routing counts go in the artifact store (counts only), for the next evaluation."""
    return f"serving/{site_id}/routing.json"


@dataclass(frozen=True)
class LoadedModel:
    verified: VerifiedVersion
    scorer: Scorer
    schema: RowSchema

    @property
    def version(self) -> str:
        return self.verified.version


class ModelService:
    """One site's models and counters; thread-safe, HTTP-agnostic."""

    def __init__(self, ctx: JobContext, site_id: str, runtime: str | None = None) -> None:
        self.ctx = ctx
        self.site = ctx.config.site(site_id)
        self.serving = ctx.config.serving
        self.policy = self.serving.policy(site_id)
        self.runtime = runtime or self.serving.runtime
        self._models: dict[Role, LoadedModel | None] = {"champion": None, "candidate": None}
        self._refused: dict[tuple[Role, str], str] = {}
        self._counts = RoutingCounts()
        self._stats = {"ok": 0, "refused": 0, "error": 0, "swaps": 0, "verification_refusals": 0}
        self._latency_sum_s = 0.0
        self._sequence = 0
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    @property
    def champion(self) -> LoadedModel | None:
        return self._models["champion"]

    @property
    def candidate(self) -> LoadedModel | None:
        return self._models["candidate"]

    # --- following the registry ------------------------------------------------------------

    def refresh(self) -> None:
        """Load the champion (and candidate, if the policy uses one) when the registry moved them."""
        with self._refresh_lock:
            name = self.ctx.config.model_name
            self._follow("champion", self._champion_version(name))
            if self.policy.mode != "champion":
                candidate = alias_version(self.ctx.tracker, name, CANDIDATE)
                champion = self.champion
                self._follow("candidate", None if champion and candidate == champion.version else candidate)

    def _governance(self) -> GovernanceConfig:
        """Governance as this site accepts it: chained by signatures from the version it accepted before."""
        source = self.ctx.governance.source
        if source is None:
            return self.ctx.governance
        return trusted_governance(source, trust_record(self.site), self.ctx.config.governance_root)

    def _champion_version(self, name: str) -> str | None:
        """The version the signed champion statement names, never the registry alias; ``None`` (keep
        serving what is loaded) when the statement is missing, unsigned or older than one seen before."""
        try:
            return verified_champion(self.ctx.store, self._governance(), name, trust_record(self.site)).version
        except ChampionError:  # nothing promoted yet: nothing to refuse
            return None
        except SignatureError as error:
            self._refuse("champion", "statement", error.message)
            return None

    def champion_refusal(self) -> tuple[str, str] | None:
        """``(version, reason)`` of the newest champion refusal (version ``statement``: the statement itself)."""
        refused = [(version, reason) for (role, version), reason in self._refused.items() if role == "champion"]
        return refused[-1] if refused else None

    def _follow(self, role: Role, version: str | None) -> None:
        current = self._models[role]
        if version is None:
            if role == "candidate" and current is not None:
                self._swap(role, None)
            return
        if current is not None and current.version == version:
            return
        try:
            loaded = self._load(role, version)
        except SignatureError as error:
            self._refuse(role, version, error.message)
            return
        self._swap(role, loaded)
        self._refused.pop((role, version), None)
        self.ctx.audit.append(
            "serving_loaded",
            f"site:{self.site.id}",
            {
                "model": loaded.verified.model,
                "version": version,
                "role": role,
                "site": self.site.id,
                "runtime": loaded.scorer.runtime,
                "provenance_sha256": loaded.verified.provenance_sha256,
                "previous": None if current is None else current.version,
            },
        )
        logger.info(
            "%s serves %s v%s as %s (%s)", self.site.id, loaded.verified.model, version, role, loaded.scorer.runtime
        )

    def _load(self, role: Role, version: str) -> LoadedModel:
        name = self.ctx.config.model_name
        fetch_files(self.ctx.tracker, self.ctx.store, name, version)
        destination = self.site.root / SERVING_DIR / f"{role}-v{version}"
        verified = verify_for_serving(
            self.ctx.store, self._governance(), name, version, destination, role, trust_record(self.site)
        )
        scorer = load_scorer(verified.files, self.runtime, self.ctx.config.model.hidden_sizes)
        fill = training_fill(self.site.processed_dir / TRAIN_FILE, self.ctx.config.features, scorer.feature_mean)
        return LoadedModel(verified, scorer, row_schema(self.ctx.config.features, self.site, fill))

    def _swap(self, role: Role, loaded: LoadedModel | None) -> None:
        if role == "candidate":
            self._archive_routing()  # the counts belong to the candidate they measured
        with self._lock:
            previous = self._models[role]
            self._models[role] = loaded  # one reference: requests in flight keep the model they read
            self._stats["swaps"] += previous is not None and loaded is not None
            if role == "candidate":
                self._counts = RoutingCounts()
        if previous is not None and (loaded is None or previous.verified.files != loaded.verified.files):
            shutil.rmtree(previous.verified.files.parent, ignore_errors=True)

    def _archive_routing(self) -> None:
        """Keep the finished candidate's counts in the store before they start again for the next one."""
        if self.routing_counts() != RoutingCounts():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.ctx.store.put_json(f"serving/{self.site.id}/history/{stamp}.json", self.routing_summary())

    def refusal(self, role: Role, version: str) -> str | None:
        """Why ``version`` was refused for ``role`` at the last attempt, if it was."""
        return self._refused.get((role, version))

    def _refuse(self, role: Role, version: str, reason: str) -> None:
        """Audit a refusal once per version and reason; the loaded model keeps serving."""
        if self._refused.get((role, version)) == reason:
            return
        self._refused[(role, version)] = reason
        with self._lock:
            self._stats["verification_refusals"] += 1
        kept = self._models[role]
        self.ctx.audit.append(
            "serving_refused",
            f"site:{self.site.id}",
            {
                "model": self.ctx.config.model_name,
                "version": version,
                "role": role,
                "site": self.site.id,
                "reason": reason,
                "kept": None if kept is None else kept.version,
            },
        )
        logger.warning("%s refused %s v%s: it did not verify", self.site.id, role, version)

    # --- answering -------------------------------------------------------------------------

    def predict(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Score one request: ``(HTTP status, JSON payload)``; a refusal names columns, never values."""
        started = time.perf_counter()
        champion = self.champion
        if champion is None:
            return self._finish("error", started, 503, {"error": "no verified champion is loaded"})
        try:
            rows = parse_body(body, self.serving.max_rows)
            check_columns(rows, champion.schema)
            matrix = rows_to_matrix(rows, champion.schema)
        except RowRefused as refusal:
            with self._lock:
                self._counts = self._counts.refused()
            return self._finish("refused", started, refusal.status, {"error": refusal.message, "fix": refusal.fix})
        with self._lock:
            sequence, self._sequence = self._sequence, self._sequence + 1
            candidate = self.candidate
        route = route_request(sequence, self.policy.mode, self.policy.canary_percent, candidate is not None)
        model = candidate if route == "candidate" and candidate is not None else champion
        probabilities = model.scorer.predict(matrix)
        agreed = None
        if self.policy.mode == "shadow" and candidate is not None:
            agreed = agreements(probabilities, candidate.scorer.predict(matrix))
        with self._lock:
            self._counts = self._counts.answered(route, len(rows))
            if agreed is not None:
                self._counts = self._counts.shadowed(len(rows), agreed)
        payload = {
            "model": model.verified.model,
            "version": model.version,
            "role": route,
            "runtime": model.scorer.runtime,
            "probabilities": [float(p) for p in probabilities],
        }
        return self._finish("ok", started, 200, payload)

    def _finish(self, outcome: str, started: float, status: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self._stats[outcome] += 1
            self._latency_sum_s += time.perf_counter() - started
        return status, payload

    def health(self) -> tuple[int, dict[str, Any]]:
        champion, candidate = self.champion, self.candidate
        payload: dict[str, Any] = {
            "status": "ok" if champion else "unavailable",
            "site": self.site.id,
            "model": self.ctx.config.model_name,
            "policy": self.policy.mode,
        }
        for role, loaded in (("champion", champion), ("candidate", candidate)):
            if loaded is not None:
                payload[role] = {
                    "version": loaded.version,
                    "runtime": loaded.scorer.runtime,
                    "provenance_sha256": loaded.verified.provenance_sha256,
                }
        return (200 if champion else 503), payload

    def routing_counts(self) -> RoutingCounts:
        with self._lock:
            return self._counts

    def routing_summary(self) -> dict[str, Any]:
        """What leaves the site about its traffic: counts and rates, the versions they are about."""
        champion, candidate = self.champion, self.candidate
        return {
            "site": self.site.id,
            "policy": self.policy.mode,
            "canary_percent": self.policy.canary_percent,
            "champion_version": None if champion is None else champion.version,
            "candidate_version": None if candidate is None else candidate.version,
            "at": time.time(),
            **self.routing_counts().to_dict(),
        }

    def publish_routing(self) -> None:
        """Write the routing counts at the site and to the artifact store, where the evaluation reads them."""
        summary = self.routing_summary()
        path = self.site.root / SERVING_DIR / "routing.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            temp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        self.ctx.store.put_json(routing_key(self.site.id), summary)

    def metrics_text(self) -> str:
        """Prometheus exposition text: counters, latency sum, the loaded versions."""
        with self._lock:
            stats, counts, latency = dict(self._stats), self._counts, self._latency_sum_s
        lines = ["# TYPE quorum_serving_requests_total counter"]
        lines += [f'quorum_serving_requests_total{{outcome="{k}"}} {stats[k]}' for k in ("ok", "refused", "error")]
        lines += [
            "# TYPE quorum_serving_request_seconds summary",
            f"quorum_serving_request_seconds_sum {latency:.6f}",
            f"quorum_serving_request_seconds_count {stats['ok'] + stats['refused'] + stats['error']}",
            "# TYPE quorum_serving_rows_total counter",
            f'quorum_serving_rows_total{{route="champion"}} {counts.champion_rows}',
            f'quorum_serving_rows_total{{route="candidate"}} {counts.candidate_rows}',
            f"quorum_serving_shadow_rows_total {counts.shadow_rows}",
            f"quorum_serving_shadow_agreements_total {counts.shadow_agreements}",
            f"quorum_serving_swaps_total {stats['swaps']}",
            f"quorum_serving_verification_refusals_total {stats['verification_refusals']}",
            "# TYPE quorum_serving_model_info gauge",
        ]
        for role, loaded in (("champion", self.champion), ("candidate", self.candidate)):
            if loaded is not None:
                lines.append(
                    f'quorum_serving_model_info{{role="{role}",version="{loaded.version}",'
                    f'runtime="{loaded.scorer.runtime}"}} 1'
                )
        return "\n".join(lines) + "\n"


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
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Method, path and status only (the request line never carries row values: rows go in the body)."""
        logger.debug("%s %s", self.command, self.path)


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
    """A started service: its HTTP server and the thread that follows the registry."""

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


def start_service(ctx: JobContext, site_id: str, port: int | None = None, runtime: str | None = None) -> RunningService:
    """Verify and load the champion, then answer on ``127.0.0.1:port`` (0: a free port) in background threads.

    Raises ``ChampionError`` or ``SignatureError`` when no champion verifies: a service never starts
    without a model it can vouch for.
    """
    service = ModelService(ctx, site_id, runtime)
    service.refresh()
    if service.champion is None:
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
    server = ServingHTTPServer(service, ctx.config.serving.port if port is None else port)
    stop = threading.Event()
    http = threading.Thread(target=server.serve_forever, name=f"serve-{site_id}", daemon=True)
    follow = threading.Thread(target=_follow_loop, args=(service, stop), name=f"follow-{site_id}", daemon=True)
    http.start()
    follow.start()
    return RunningService(service, server, stop, (http, follow))


def _follow_loop(service: ModelService, stop: threading.Event) -> None:
    """Poll the registry until stopped; a failed poll keeps the loaded models and is tried again."""
    while not stop.wait(service.serving.poll_interval_s):
        try:
            service.refresh()
            service.publish_routing()
        except QuorumError as error:
            logger.warning("%s: could not check the registry (%s); serving on", service.site.id, error.headline)
        except Exception as exc:  # the service must outlive a registry hiccup; the type says what happened
            logger.warning("%s: could not check the registry (%s); serving on", service.site.id, type(exc).__name__)
