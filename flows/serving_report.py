"""What the sites' services saw since the last evaluation, added to the next evaluation's run.

Each service publishes its routing counts (``serving/<site>/routing.json`` in the artifact store:
requests and rows per route, shadow rows and agreements, refusals; never a row). The evaluation
stage logs them beside the candidate's metrics, so a reviewer sees how a shadowed or canaried
candidate fared on live traffic next to how it fared on the test splits.
"""

from __future__ import annotations

from typing import Any

from quorum.flows.context import JobContext
from quorum.flows.serving_service import routing_key

_COUNTS = ("champion_requests", "candidate_requests", "shadow_rows", "shadow_agreements", "refused_requests")
_RATES = ("shadow_agreement_rate", "candidate_share")


def log_serving_routing(ctx: JobContext, run_id: str) -> dict[str, dict[str, Any]]:
    """Log every site's newest routing summary to ``run_id`` (metrics and ``serving_routing.json``)."""
    summaries: dict[str, dict[str, Any]] = {}
    for site_id in ctx.config.site_ids:
        key = routing_key(site_id)
        if ctx.store.exists(key):
            data = ctx.store.get_json(key)
            if isinstance(data, dict):
                summaries[site_id] = data
    for site_id, summary in summaries.items():
        values = {name: summary.get(name) for name in (*_COUNTS, *_RATES)}
        metrics = {f"serving.{site_id}.{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))}
        ctx.tracker.log_metrics(run_id, metrics)
    if summaries:
        ctx.tracker.log_dict(run_id, summaries, "serving_routing.json")
    return summaries
