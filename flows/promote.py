"""Stage 5 (promotion): register the candidate, collect signatures, and make it champion.

The champion alias moves only when the verdict passed and a quorum of distinct approvers signed the
version's files, which include its provenance statement (written before anyone signs). Moving it,
tagging the version and recording the audit entry form one Prefect transaction: if any step fails
the alias is put back, so no model is ever half-promoted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction, transaction

from quorum.configs.errors import GateFailed
from quorum.evaluation.gates import Verdict
from quorum.flows.context import JobContext
from quorum.lineage.provenance import BuildFacts, SiteEvidence, build_statement, provenance_digest, write_provenance
from quorum.lineage.registry import fetch_files, model_key, sign_version, signatures_key, verify_version
from quorum.lineage.signing import QuorumResult, check_quorum
from quorum.lineage.tracking import CANDIDATE, CHAMPION, alias_version, log_model, register, set_alias, set_version_tags
from quorum.tasks.model import Weights, model_from_weights


@dataclass(frozen=True)
class PromotionResult:
    version: str
    champion: bool
    quorum: QuorumResult
    previous_champion: str | None


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
def record_promotion(ctx: JobContext, version: str, quorum: QuorumResult, previous: str | None) -> None:
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
            "job_id": ctx.job_id,
        },
    )


def make_champion(ctx: JobContext, version: str) -> PromotionResult:
    """Verify quorum and provenance again, then move the alias, tag and audit as one transaction."""
    quorum = verify_version(ctx.store, ctx.governance, ctx.config.model_name, version)
    with transaction() as txn:
        txn.set("ctx", ctx)
        previous = move_champion_alias(ctx, version)
        record_promotion(ctx, version, quorum, previous)
    return PromotionResult(version, True, quorum, previous)


@flow(name="promote-approved", validate_parameters=False)
def promote_approved(ctx: JobContext, version: str) -> PromotionResult:
    """Promotion of a version whose quorum was completed later by ``quorum approve``."""
    return make_champion(ctx, version)


def _register_candidate(
    ctx: JobContext, weights: Weights, feature_mean: list[float], run_id: str, tags: dict[str, str]
) -> str:
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
) -> PromotionResult:
    """Register a passed candidate, write its provenance, sign it, and promote it once the quorum is met.

    ``site_evidence`` is each site's data hash and contract outcome for the provenance statement;
    when a caller has none, the data hashes in ``lineage_tags`` (sites that passed) are used.
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
    version = _register_candidate(ctx, weights, feature_mean, run_id, tags)
    name = ctx.config.model_name
    files = fetch_files(ctx.tracker, ctx.store, name, version)
    _add_serving_variants(ctx, files, version, weights)
    facts = _build_facts(ctx, verdict, lineage_tags, run_id, site_evidence)
    provenance = write_provenance(files, build_statement(files, name, version, facts))
    ctx.store.publish(model_key(name, version), files)
    set_version_tags(ctx.tracker, name, version, {"provenance.sha256": provenance})
    signatures = sign_version(ctx.store, name, version, approver_keys)
    set_version_tags(ctx.tracker, name, version, {f"signature.{s.approver}": s.digest for s in signatures})
    quorum = check_quorum(files, ctx.store.checkout(signatures_key(name, version)), ctx.governance)
    if not quorum.met:
        ctx.audit.append(
            "awaiting_approval",
            "coordinator",
            {"model": name, "version": version, "valid": list(quorum.valid_approvers)},
        )
        logger.warning("%s v%s awaits approvals: %d of %d", name, version, len(quorum.valid_approvers), quorum.required)
        return PromotionResult(version, False, quorum, alias_version(ctx.tracker, name, CHAMPION))
    return make_champion(ctx, version)


def _add_serving_variants(ctx: JobContext, files: Path, version: str, weights: Weights) -> None:
    """The ONNX and int8 variants go into the model folder before provenance and signatures cover it."""
    from quorum.flows.variants import export_serving_variants

    export_serving_variants(ctx, files, version, weights)


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
