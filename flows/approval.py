"""The lifecycle run waiting for its approvers: paused in the Prefect UI with the verdict linked.

A run started from a deployment (schedule, UI, retraining on drift) holds no private key, so its
``promote`` subflow ends with the candidate awaiting approval. ``await_approval``, called in the
lifecycle run's own body, publishes the verdict as a Markdown artifact and pauses that run under the
artifact's key. ``quorum approve`` (``promote.approve_flow``) promotes once its signature completes the
quorum and resumes the run; the run then checks the signed champion statement before it goes on.
"""

from __future__ import annotations

from time import monotonic

from prefect import get_run_logger

from quorum.configs.errors import NotPermitted, QuorumNotMet
from quorum.evaluation.gates import Verdict
from quorum.flows.context import JobContext
from quorum.flows.promote import (
    APPROVAL_TIMEOUT_S,
    PromotionResult,
    files_quorum,
    pending_quorum,
    promote_approved,
)
from quorum.lineage import champion
from quorum.lineage.signing import today_utc


def await_approval(ctx: JobContext, pending: PromotionResult, verdict: Verdict, verdict_run_id: str) -> PromotionResult:
    """Pause the calling flow run, awaiting approval, with the verdict linked; return once it is champion.

    Call it in the body of the run ``pending.awaiting_run`` names (the lifecycle run): ``quorum approve``
    resumes that run once its signature completed the quorum and promoted the version. A run resumed
    any other way (the UI's Resume button) promotes through ``promote-approved`` when the quorum is
    met, or pauses again. After ``APPROVAL_TIMEOUT_S`` without a quorum the run fails; the signatures
    already made still count for a later ``quorum approve``.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext
    from prefect.flow_runs import pause_flow_run

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or str(context.flow_run.id) != pending.awaiting_run:
        raise NotPermitted(
            f"only flow run {pending.awaiting_run} may wait for the approval of v{pending.version}",
            fix="call await_approval in the body of the run the promotion named (the lifecycle run)",
        )
    key = approval_key(ctx.config.model_name, pending.version)
    create_markdown_artifact(
        key=key,
        markdown=approval_markdown(ctx, pending, verdict, verdict_run_id),
        description=f"{ctx.config.model_name} v{pending.version} awaits approval",
    )
    logger = get_run_logger()
    deadline = monotonic() + APPROVAL_TIMEOUT_S
    pauses = 0
    while (promoted := _settle_approval(ctx, pending)) is None:
        remaining_s = int(deadline - monotonic())
        if remaining_s <= 0:
            raise QuorumNotMet(
                f"{ctx.config.model_name} v{pending.version} got no quorum within {APPROVAL_TIMEOUT_S // 86400} days",
                fix=f"the signatures made still count: `quorum approve {ctx.config.model_name} "
                f"--version {pending.version} --key KEY`",
            )
        if pauses:
            logger.warning("resumed before the quorum promoted v%s: pausing again", pending.version)
        pause_flow_run(timeout=remaining_s, key=key if not pauses else f"{key}-{pauses}")
        pauses += 1
    return promoted


def _settle_approval(ctx: JobContext, pending: PromotionResult) -> PromotionResult | None:
    """The promotion once the version is champion (promoting it here when the quorum is met), else None."""
    name, version, day = ctx.config.model_name, pending.version, today_utc()
    current = champion.read_current(ctx.store, name)
    if current is not None and current[0].get("version") == version:  # `quorum approve` promoted it
        return PromotionResult(version, True, files_quorum(ctx, version, day), pending.previous_champion)
    if pending_quorum(ctx, version, day)[1] >= ctx.governance.quorum:
        return promote_approved(ctx, version)
    return None


def approval_key(model_name: str, version: str) -> str:
    """The key of a version's approval artifact, and of the pause awaiting it."""
    return f"approval-{model_name.lower().replace('_', '-').replace('.', '-')}-v{version}"


def approval_markdown(ctx: JobContext, pending: PromotionResult, verdict: Verdict, verdict_run_id: str) -> str:
    """What an approver reads in the Prefect UI before signing: the verdict, where it is, what to run."""
    name = ctx.config.model_name
    gates = "\n".join(f"| {g.name} | {'pass' if g.passed else 'FAIL'} | {g.reason} |" for g in verdict.gates)
    uri = ctx.tracker.uri.rstrip("/")
    links = ""
    if uri.startswith(("http://", "https://")):
        links = (
            f"Open the [verdict run]({uri}/#/experiments/{ctx.tracker.experiment_id}/runs/{verdict_run_id}) and "
            f"the [model version]({uri}/#/models/{name}/versions/{pending.version}) in MLflow.\n\n"
        )
    return (
        f"# {name} v{pending.version} awaits approval\n\n"
        f"Verdict: **{'passed' if verdict.passed else 'failed'}**. Full report: MLflow run `{verdict_run_id}` "
        f"(artifact `verdict.html`, tracking store `{ctx.tracker.uri}`). Candidate: MLflow model `{name}` "
        f"version {pending.version}.\n\n{links}"
        f"| gate | outcome | detail |\n|---|---|---|\n{gates}\n\n"
        f"Approvers ({ctx.governance.quorum} needed) sign on their own machines:\n\n"
        f"```\nquorum approve {name} --version {pending.version} --key YOUR.key\n```\n\n"
        "The run resumes by itself once the quorum promoted the version.\n"
    )
