"""Stage 6: drift monitoring. Each site compares its training snapshot with its current window
(Evidently); only the summaries come back, and a pure decision says whether to retrain."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from quorum.evaluation.drift import DriftSummary, retrain_decision
from quorum.flows.context import JobContext
from quorum.flows.runners.local import SiteFailure, SiteRunner
from quorum.lineage.registry import load_verified_weights
from quorum.lineage.tracking import CHAMPION, alias_version
from quorum.tasks.wire import encode_drift


@dataclass(frozen=True)
class MonitorResult:
    summaries: dict[str, DriftSummary]
    failures: dict[str, str]
    champion_version: str | None
    retrain: bool
    reason: str


@flow(name="monitor", validate_parameters=False)
def monitor_flow(ctx: JobContext, runner: SiteRunner, site_ids: list[str], run_id: str) -> MonitorResult:
    logger = get_run_logger()
    name = ctx.config.model_name
    version = alias_version(ctx.tracker, name, CHAMPION)
    champion = None if version is None else load_verified_weights(ctx.tracker, ctx.store, ctx.governance, name, version)
    outcomes = runner.monitor(site_ids, champion)
    summaries = {s: o for s, o in outcomes.items() if isinstance(o, DriftSummary)}
    failures = {s: o.describe() for s, o in outcomes.items() if isinstance(o, SiteFailure)}
    for site_id, reason in failures.items():
        logger.warning("drift check skipped at %s: %s", site_id, reason)
    retrain, reason = retrain_decision(list(summaries.values()), ctx.config.drift)
    for site_id, summary in summaries.items():
        metrics = {f"{site_id}.drift_share": summary.drift_share}
        if summary.prediction is not None:
            metrics[f"{site_id}.prediction_drift_statistic"] = summary.prediction.statistic
        ctx.tracker.log_metrics(run_id, metrics)
    ctx.tracker.log_dict(run_id, {s: encode_drift(d) for s, d in summaries.items()}, "drift_summaries.json")
    if retrain:
        ctx.audit.append("retraining_recommended", "monitor", {"reason": reason, "job_id": ctx.job_id})
    logger.info("drift: %s", reason)
    return MonitorResult(summaries, failures, version, retrain, reason)
