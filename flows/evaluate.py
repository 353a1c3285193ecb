"""Stage 3: federated evaluation on every site's held-out data, then the pure gate decision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prefect import flow, get_run_logger

from quorum.configs.errors import NotEnoughSites
from quorum.evaluation.gates import Coverage, Verdict, decide
from quorum.evaluation.report import EvaluationReport, SiteEvaluation
from quorum.evaluation.verdict_report import verdict_html
from quorum.flows.context import JobContext
from quorum.flows.runners.local import SiteFailure, SiteRunner
from quorum.flows.serving_report import log_serving_routing
from quorum.lineage.registry import load_verified_weights
from quorum.lineage.tracking import CHAMPION, alias_version
from quorum.tasks.site import DataFingerprint
from quorum.tasks.weights import Weights
from quorum.tasks.wire import encode_evaluation


def site_coverage(
    configured: Sequence[str], excluded: Mapping[str, str], rounds: Sequence[tuple[Sequence[str], Mapping[str, str]]]
) -> Coverage:
    """Which configured sites trained the candidate: those with an update aggregated in some round.

    ``excluded`` are the sites preprocessing left out, with why; ``rounds`` each round's accepted
    sites and rejected ones (with why). A site that never trained is listed with its newest reason.
    """
    trained = {site for accepted, _ in rounds for site in accepted}
    reasons = {site: why.removeprefix(f"{site}: ") for site, why in excluded.items()}
    for _, rejected in rounds:
        reasons.update({site: f"update rejected: {why}" for site, why in rejected.items() if site not in trained})
    left_out = {site: reasons.get(site, "asked in no round") for site in configured if site not in trained}
    return Coverage.of(tuple(configured), left_out)


@dataclass(frozen=True)
class EvaluationResult:
    candidate: EvaluationReport
    champion: EvaluationReport | None
    champion_version: str | None
    verdict: Verdict


def _report(
    outcomes: dict[str, SiteEvaluation | SiteFailure], fingerprints: dict[str, DataFingerprint]
) -> EvaluationReport:
    sites = tuple(o for o in outcomes.values() if isinstance(o, SiteEvaluation))
    failed = [o.describe() for o in outcomes.values() if isinstance(o, SiteFailure)]
    if not sites:
        raise NotEnoughSites("no site could evaluate the model: " + "; ".join(failed), fix="fix the sites named")
    return EvaluationReport(sites=sites, contracts_passed={s: fp.contract.passed for s, fp in fingerprints.items()})


def _champion_weights(ctx: JobContext, candidate: Weights) -> tuple[str | None, Weights | None]:
    """The current champion, verified like a site would, if its layout matches the candidate's."""
    version = alias_version(ctx.tracker, ctx.config.model_name, CHAMPION)
    if version is None:
        return None, None
    weights = load_verified_weights(ctx.tracker, ctx.store, ctx.governance, ctx.config.model_name, version)
    if [w.shape for w in weights] != [w.shape for w in candidate]:
        get_run_logger().warning("champion v%s has another layout; no regression check", version)
        return version, None
    return version, weights


@flow(name="evaluate", validate_parameters=False)
def evaluate_flow(
    ctx: JobContext,
    runner: SiteRunner,
    candidate: Weights,
    fingerprints: dict[str, DataFingerprint],
    run_id: str,
    coverage: Coverage | None = None,
) -> EvaluationResult:
    site_ids = sorted(fingerprints)
    report = _report(runner.evaluate(site_ids, candidate), fingerprints)
    champion_version, champion_weights = _champion_weights(ctx, candidate)
    champion = None
    if champion_weights is not None:
        champion = _report(runner.evaluate(site_ids, champion_weights), fingerprints)
    verdict = decide(report, champion, ctx.config.gates, coverage)
    tracker = ctx.tracker
    tracker.log_metrics(run_id, {f"candidate.{k}": v for k, v in report.metrics.items()})
    for site_id, metrics in report.site_metrics().items():
        tracker.log_metrics(run_id, {f"site.{site_id}.{k}": v for k, v in metrics.items()})
    if champion is not None:
        tracker.log_metrics(run_id, {f"champion.{k}": v for k, v in champion.metrics.items()})
    tracker.log_dict(run_id, verdict.to_dict(), "verdict.json")
    tracker.log_text(run_id, verdict.to_markdown(), "verdict.md")
    title = f"{ctx.config.model_name} candidate, job {ctx.job_id}"
    page = verdict_html(verdict, report, ctx.config.gates, champion, title)
    tracker.log_text(run_id, page, "verdict.html")
    tracker.log_dict(run_id, {s.site_id: encode_evaluation(s) for s in report.sites}, "site_counts.json")
    log_serving_routing(ctx, run_id)
    ctx.audit.append("gate_verdict", "coordinator", {"job_id": ctx.job_id, **verdict.to_dict()})
    logger = get_run_logger()
    for site_id, reason in verdict.excluded:
        logger.warning("site %s did not train the candidate: %s", site_id, reason)
    logger.info("verdict: %s", verdict.headline())
    return EvaluationResult(report, champion, champion_version, verdict)
