"""Stage 5 (promotion): register the candidate, collect signatures, and make it champion.

A version becomes champion only when the verdict passed, a quorum of distinct approvers signed its
files (which include its provenance statement, written before anyone signs) and the same quorum
signed its champion statement (``quorum.lineage.champion``: version, provenance digest, sequence,
previous statement). Publishing the statement, moving the MLflow alias (a mirror of the statement),
tagging the version and recording the audit entry form one Prefect transaction: if any step fails,
the statement and the alias are put back, so no model is ever half-promoted.

``quorum approve`` runs the same steps (``approve_flow``): it adds one approver's signatures and, when
that completes the quorum, promotes inside the same transaction. A lifecycle started by a schedule or
from the Prefect UI holds no private key: its ``promote`` subflow registers and verifies the candidate
and returns it awaiting approval; the lifecycle run itself then pauses (``quorum.flows.approval``), with the
verdict linked in a Markdown artifact, and ``quorum approve`` resumes it once the quorum promoted.

A registered candidate is named twice: MLflow's ``candidate`` alias, for people browsing MLflow, and
the candidate pointer in the artifact store (``quorum.lineage.candidate``), written once the version's
files, provenance and this run's signatures are published there. The sites' services read the pointer,
so they never need MLflow for shadow or canary routing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction, transaction

from quorum.configs.errors import ConfigError, GateFailed, NotPermitted, QuorumNotMet
from quorum.evaluation.gates import Verdict
from quorum.flows.context import JobContext
from quorum.flows.variants import VariantCheck, export_serving_variants
from quorum.lineage import champion
from quorum.lineage.anchor import sign_checkpoint
from quorum.lineage.candidate import publish_candidate
from quorum.lineage.envelope import Signed
from quorum.lineage.keys import approver_for_private_key
from quorum.lineage.provenance import (
    BuildFacts,
    SiteEvidence,
    build_statement,
    provenance_digest,
    verify_provenance,
    write_provenance,
)
from quorum.lineage.registry import fetch_files, model_key, sign_version, signatures_key, verify_version
from quorum.lineage.signing import QuorumResult, check_quorum, today_utc
from quorum.lineage.tracking import CANDIDATE, CHAMPION, alias_version, log_model, register, set_alias, set_version_tags
from quorum.tasks.weights import Weights

APPROVAL_TIMEOUT_S = 14 * 24 * 3600  # a paused run fails after two weeks without a quorum


@dataclass(frozen=True)
class PromotionResult:
    version: str
    champion: bool
    quorum: QuorumResult
    previous_champion: str | None
    awaiting_run: str | None = None  # the deployment run that pauses for the approvers (``approval.await_approval``)


@dataclass(frozen=True)
class ApprovalResult:
    approver: str
    version: str
    approvals: int
    required: int
    promotion: PromotionResult | None


@task(cache_policy=NO_CACHE)
def move_champion_alias(ctx: JobContext, version: str) -> str | None:
    previous = alias_version(ctx.tracker, ctx.config.model_name, CHAMPION)
    txn = get_transaction()
    if txn is not None:
        txn.set("previous_champion", previous)
    set_alias(ctx.tracker, ctx.config.model_name, CHAMPION, version)
    return previous


@move_champion_alias.on_rollback
def _restore_champion_alias(txn: Transaction) -> None:
    ctx: JobContext = txn.get("ctx")
    set_alias(ctx.tracker, ctx.config.model_name, CHAMPION, txn.get("previous_champion"))


@task(cache_policy=NO_CACHE)
def publish_statement(ctx: JobContext, payload: dict[str, object], signatures: tuple[Signed, ...]) -> None:
    """Make the signed statement current: from here on, sites deploy what it names."""
    previous = champion.publish(ctx.store, payload, signatures)
    txn = get_transaction()
    if txn is not None:
        txn.set("previous_statement", previous)


@publish_statement.on_rollback
def _restore_statement(txn: Transaction) -> None:
    ctx: JobContext = txn.get("ctx")
    champion.unpublish(ctx.store, ctx.config.model_name, txn.get("previous_statement"))


@task(cache_policy=NO_CACHE)
def record_promotion(ctx: JobContext, version: str, quorum: QuorumResult, previous: str | None, sequence: int) -> None:
    provenance = provenance_digest(ctx.store.checkout(model_key(ctx.config.model_name, version)))
    set_version_tags(
        ctx.tracker,
        ctx.config.model_name,
        version,
        {
            "quorum.signers": ",".join(quorum.valid_approvers),
            "quorum.required": str(quorum.required),
            "stage": CHAMPION,
            "previous_champion": previous or "none",
            "champion.sequence": str(sequence),
        },
    )
    ctx.audit.append(
        "promotion",
        "coordinator",
        {
            "model": ctx.config.model_name,
            "version": version,
            "previous": previous,
            "signers": list(quorum.valid_approvers),
            "provenance_sha256": provenance,
            "statement_sequence": sequence,
            "job_id": ctx.job_id,
        },
    )


@dataclass(frozen=True)
class _Promotion:
    """A promotion checked and ready to apply: the statement and the signatures that carry it."""

    version: str
    quorum: QuorumResult
    payload: dict[str, object]
    signatures: tuple[Signed, ...]
    sequence: int


def make_champion(ctx: JobContext, version: str, today: date | None = None) -> PromotionResult:
    """Verify the files' quorum, provenance and the statement's quorum, then promote as one transaction."""
    ready = _check_promotion(ctx, version, today or today_utc())
    with transaction() as txn:
        txn.set("ctx", ctx)
        previous = _apply_promotion(ctx, ready)
    sign_checkpoint(ctx.audit, ctx.governance)
    return PromotionResult(version, True, ready.quorum, previous)


def _apply_promotion(ctx: JobContext, ready: _Promotion) -> str | None:
    """The promotion steps; call inside a transaction, whose rollback restores the statement and alias."""
    publish_statement(ctx, ready.payload, ready.signatures)
    previous = move_champion_alias(ctx, ready.version)
    record_promotion(ctx, ready.version, ready.quorum, previous, ready.sequence)
    return previous


def _check_promotion(ctx: JobContext, version: str, day: date) -> _Promotion:
    name = ctx.config.model_name
    quorum = verify_version(ctx.store, ctx.governance, name, version, day)
    provenance = provenance_digest(ctx.store.checkout(model_key(name, version)))
    payload = champion.proposal(ctx.store, ctx.governance, name, version, provenance, day)
    signatures = champion.approvals(ctx.store, payload)
    try:
        statement = champion.verify_statement(ctx.store, ctx.governance, payload, signatures, day)
    except QuorumNotMet as error:
        raise QuorumNotMet(
            error.message,
            fix=f"each approver signs the champion statement with `quorum approve {name} --version {version} "
            "--key KEY` (a statement proposed before another champion was named must be signed again)",
        ) from None
    return _Promotion(version, quorum, payload, signatures, statement.sequence)


@flow(name="promote-approved", validate_parameters=False)
def promote_approved(ctx: JobContext, version: str) -> PromotionResult:
    """Promotion of a version whose quorum was completed later by ``quorum approve``."""
    return make_champion(ctx, version)


def sign_candidate(ctx: JobContext, version: str, keys: Sequence[tuple[str, Path]], day: date) -> None:
    """Each key signs the version's files (model-signing) and its champion statement proposal."""
    name = ctx.config.model_name
    signatures = sign_version(ctx.store, name, version, keys)
    set_version_tags(ctx.tracker, name, version, {f"signature.{s.approver}": s.digest for s in signatures})
    provenance = provenance_digest(ctx.store.checkout(model_key(name, version)))
    payload = champion.proposal(ctx.store, ctx.governance, name, version, provenance, day)
    for approver, key in keys:
        champion.add_approval(ctx.store, payload, key, approver)


def pending_quorum(ctx: JobContext, version: str, day: date) -> tuple[QuorumResult, int]:
    """The files' quorum and how many approvers signed the current statement proposal."""
    name = ctx.config.model_name
    files = ctx.store.checkout(model_key(name, version))
    quorum = check_quorum(files, ctx.store.checkout(signatures_key(name, version)), ctx.governance, day)
    payload = champion.proposal(ctx.store, ctx.governance, name, version, provenance_digest(files), day)
    statement = champion.tally_approvals(ctx.store, ctx.governance, payload, day)
    return quorum, len(set(quorum.valid_approvers) & set(statement.valid))


def files_quorum(ctx: JobContext, version: str, day: date) -> QuorumResult:
    """Which approvers validly signed the version's files (model-signing); it writes nothing."""
    name = ctx.config.model_name
    files = ctx.store.checkout(model_key(name, version))
    return check_quorum(files, ctx.store.checkout(signatures_key(name, version)), ctx.governance, day)


@flow(name="approve", validate_parameters=False)
def approve_flow(ctx: JobContext, version: str, key: Path) -> ApprovalResult:
    """One approver's ``quorum approve``: sign the version and, when that completes the quorum, promote it.

    The signature, the approval's audit entry and (once the quorum is met) the promotion steps all run
    here, in the promotion's transaction.
    """
    day = today_utc()
    name = ctx.config.model_name
    approver = approver_for_private_key(key, ctx.governance)
    problem = ctx.governance.approver(approver).key_problem(day)
    if problem:
        raise NotPermitted(f"{problem}; its signatures would not count", fix="sign with a current, unrevoked key")
    _require_registered(ctx, version)
    verify_provenance(fetch_files(ctx.tracker, ctx.store, name, version), name, version)  # sign only what it claims
    promotion = None
    with transaction() as txn:
        txn.set("ctx", ctx)
        approvals = record_approval(ctx, version, approver, key, day)
        current = champion.read_current(ctx.store, name)
        if approvals >= ctx.governance.quorum and (current is None or current[0].get("version") != version):
            ready = _check_promotion(ctx, version, day)
            promotion = PromotionResult(version, True, ready.quorum, _apply_promotion(ctx, ready))
    sign_checkpoint(ctx.audit, ctx.governance)
    if approvals >= ctx.governance.quorum:  # promoted now or before: a run paused for this version goes on
        resume_waiting_run(ctx, version)
    return ApprovalResult(approver, version, approvals, ctx.governance.quorum, promotion)


@task(cache_policy=NO_CACHE)
def record_approval(ctx: JobContext, version: str, approver: str, key: Path, day: date) -> int:
    """Sign the files and the statement proposal, audit the approval; return how many approvers signed both."""
    sign_candidate(ctx, version, [(approver, key)], day)
    ctx.audit.append("approval", approver, {"model": ctx.config.model_name, "version": version})
    return pending_quorum(ctx, version, day)[1]


def resume_waiting_run(ctx: JobContext, version: str) -> str | None:
    """Resume the lifecycle run paused for this version's approval, if one is paused on a reachable server.

    ``awaiting_approval`` names the run started from the deployment (the lifecycle run, which pauses
    itself in ``approval.await_approval``); a run that is not paused (it ended, or never paused) is left alone.
    """
    import os
    from uuid import UUID

    run_ids = [
        str(entry.details.get("flow_run_id"))
        for entry in ctx.audit.entries()
        if entry.event == "awaiting_approval"
        and entry.details.get("version") == version
        and entry.details.get("model") == ctx.config.model_name
        and entry.details.get("flow_run_id")
    ]
    if not run_ids or not os.environ.get("PREFECT_API_URL"):
        return None
    from prefect import get_client
    from prefect.exceptions import PrefectException
    from prefect.flow_runs import resume_flow_run

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(run_ids[-1])).state
        if state is None or not state.is_paused():
            return None
        resume_flow_run(UUID(run_ids[-1]))
    except (PrefectException, RuntimeError, ValueError, OSError) as exc:
        get_run_logger().warning("could not resume the paused run %s: %s", run_ids[-1], exc)
        return None
    return run_ids[-1]


def _require_registered(ctx: JobContext, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        ctx.tracker.client.get_model_version(ctx.config.model_name, version)
    except MlflowException as exc:
        raise ConfigError(
            f"{ctx.config.model_name} has no version {version}", fix="see the versions with `quorum ui`"
        ) from exc


def _register_candidate(
    ctx: JobContext, weights: Weights, feature_mean: list[float], run_id: str, tags: dict[str, str]
) -> str:
    from quorum.tasks.model import model_from_weights

    model = model_from_weights(weights, ctx.config.model.hidden_sizes)
    # three rows derived from federated means (no site row): a batch of 0 or 1 would pin the exported batch size
    mean = np.asarray(feature_mean, dtype=np.float32)
    example = np.stack([mean, mean * 0.9, mean * 1.1]).astype(np.float32)
    uri = log_model(ctx.tracker, run_id, model, example)
    version = register(ctx.tracker, ctx.config.model_name, uri, run_id, tags)
    set_alias(ctx.tracker, ctx.config.model_name, CANDIDATE, version)
    return version


@flow(name="promote", validate_parameters=False)
def promote_flow(
    ctx: JobContext,
    weights: Weights,
    feature_mean: list[float],
    verdict: Verdict,
    lineage_tags: dict[str, str],
    run_id: str,
    approver_keys: Sequence[tuple[str, Path]] = (),
    site_evidence: Sequence[SiteEvidence] = (),
    variant_check: VariantCheck | None = None,
) -> PromotionResult:
    """Register a passed candidate, write its provenance, sign it, and promote it once the quorum is met.

    ``site_evidence`` is each site's data hash and contract outcome for the provenance statement;
    when a caller has none, the data hashes in ``lineage_tags`` (sites that passed) are used.
    ``variant_check`` names the job's site runner and the sites that compare the ONNX variants with
    torch on their own test splits; without it every site is named in ``variant.sites_skipped``.
    """
    logger = get_run_logger()
    if not verdict.passed:
        raise GateFailed(
            f"the candidate failed {len(verdict.failed)} of {len(verdict.gates)} gates:\n{verdict.describe_failures()}",
            fix="nothing was registered; improve the model or data, or review the gates in the federation config",
        )
    tags = {
        **lineage_tags,
        "verdict": "passed",
        "verdict.gates": json.dumps([g.name for g in verdict.gates]),
        **verdict.tags(),
    }
    if approver_keys and _deployment_run() is not None:
        raise NotPermitted(
            "a run started from a deployment (schedule or UI) was given approver private keys",
            fix="remove approver_keys from the deployment: approvers sign with `quorum approve` on their own machines",
        )
    version = _register_candidate(ctx, weights, feature_mean, run_id, tags)
    name = ctx.config.model_name
    day = today_utc()
    files = fetch_files(ctx.tracker, ctx.store, name, version)
    _add_serving_variants(ctx, files, version, weights, variant_check)
    facts = _build_facts(ctx, verdict, lineage_tags, run_id, site_evidence)
    provenance = write_provenance(files, build_statement(files, name, version, facts))
    ctx.store.publish(model_key(name, version), files)
    set_version_tags(ctx.tracker, name, version, {"provenance.sha256": provenance})
    verify_provenance(files, name, version)  # the candidate approvers will see is whole and about itself
    sign_candidate(ctx, version, approver_keys, day)
    # the sites' services follow this pointer, not the alias: it names the version only once its files
    # are in the store, and it is what they read without MLflow (the alias moved at registration above)
    publish_candidate(ctx.store, name, version)
    quorum, approvals = pending_quorum(ctx, version, day)
    if approvals >= ctx.governance.quorum:
        return make_champion(ctx, version, day)
    waiting_run = _deployment_run()
    ctx.audit.append(
        "awaiting_approval",
        "coordinator",
        {
            "model": name,
            "version": version,
            "valid": list(quorum.valid_approvers),
            "flow_run_id": waiting_run,
            "provenance_sha256": provenance,
        },
    )
    sign_checkpoint(ctx.audit, ctx.governance)
    logger.warning("%s v%s awaits approvals: %d of %d", name, version, approvals, quorum.required)
    return PromotionResult(version, False, quorum, alias_version(ctx.tracker, name, CHAMPION), waiting_run)


def _deployment_run() -> str | None:
    """The id of the flow run started from a deployment (schedule or UI): this run, or the parent run of
    this subflow (the lifecycle run, which pauses for the approvers); None for an in-process run."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = None if context is None else context.flow_run
    if run is None:
        return None
    if run.deployment_id is not None:
        return str(run.id)
    if run.parent_task_run_id is None:
        return None
    from prefect import get_client

    with get_client(sync_client=True) as client:
        parent = client.read_task_run(run.parent_task_run_id).flow_run_id
        if parent is None or client.read_flow_run(parent).deployment_id is None:
            return None
    return str(parent)


def _add_serving_variants(
    ctx: JobContext, files: Path, version: str, weights: Weights, check: VariantCheck | None
) -> None:
    """The ONNX and int8 variants go into the model folder before provenance and signatures cover it."""
    export_serving_variants(ctx, files, version, weights, check)


def _build_facts(
    ctx: JobContext, verdict: Verdict, lineage_tags: dict[str, str], run_id: str, evidence: Sequence[SiteEvidence]
) -> BuildFacts:
    sites = tuple(evidence) or tuple(
        SiteEvidence(key.removeprefix("data."), value, contract_passed=True)
        for key, value in lineage_tags.items()
        if key.startswith("data.")
    )
    return BuildFacts(
        job_id=ctx.job_id,
        config_hash=lineage_tags.get("config_hash", ctx.config.config_hash()),
        git_commit=lineage_tags.get("git_commit", "unknown"),
        mlflow_run_id=lineage_tags.get("mlflow_run", run_id),
        mlflow_model_run_id=run_id,
        sites=sites,
        verdict=verdict.to_dict(),
    )


def describe_pending(result: PromotionResult, model_name: str) -> str:
    need = result.quorum.required - len(result.quorum.valid_approvers)
    command = f"quorum approve {model_name} --version {result.version} --key KEY"
    return f"{model_name} v{result.version} needs {need} more approval(s): {command}"
