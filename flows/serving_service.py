"""A site's service answering requests: scoring, routing by policy, health, metrics and routing counts.

``ModelService`` adds the answering side to the followed models (``quorum.flows.serving_models``):
``predict`` takes a JSON body in the site's raw feature schema (row objects or columns), refuses
PII, unknown and missing columns by name (never by value), routes by the site's policy and answers
probabilities with the version that produced them. Routing counts leave the site as counts only.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from quorum.flows.deploy import SiteContext
from quorum.flows.serving_models import SERVING_DIR, ServedModels
from quorum.tasks.routing import RoutingCounts, agreements, route_request
from quorum.tasks.serving_rows import RowRefused, batch_matrix, parse_body


def routing_key(site_id: str) -> str:
    """Where a site's routing counts go in the artifact store (counts only), for the next evaluation."""
    return f"serving/{site_id}/routing.json"


class ModelService(ServedModels):
    """One site's models and counters; thread-safe, HTTP-agnostic."""

    def __init__(self, ctx: SiteContext, site_id: str, runtime: str | None = None) -> None:
        super().__init__(ctx, site_id, runtime)
        self._counts = RoutingCounts()
        self._latency_sum_s = 0.0
        self._sequence = 0

    def _candidate_leaving(self) -> None:
        self._archive_routing()

    def _candidate_changed(self) -> None:
        self._counts = RoutingCounts()

    def _archive_routing(self) -> None:
        """Keep the finished candidate's counts in the store before they start again for the next one."""
        if self.routing_counts() != RoutingCounts():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.ctx.store.put_json(f"serving/{self.site.id}/history/{stamp}.json", self.routing_summary())

    def predict(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Score one request: ``(HTTP status, JSON payload)``; a refusal names columns, never values."""
        started = time.perf_counter()
        champion = self.champion
        if champion is None:
            payload = {
                "error": "no verified champion is loaded",
                "fix": "retry once a champion is promoted and verifies at this site (GET /health says when)",
            }
            return self._finish("error", started, 503, payload)
        try:
            batch = parse_body(body, self.serving.max_rows)
            matrix = batch_matrix(batch, champion.schema)
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
            self._counts = self._counts.answered(route, batch.size)
            if agreed is not None:
                self._counts = self._counts.shadowed(batch.size, agreed)
        payload = {
            "model": model.verified.model,
            "version": model.version,
            "role": route,
            "runtime": model.scorer.runtime,
            "probabilities": probabilities.astype(float).tolist(),
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
