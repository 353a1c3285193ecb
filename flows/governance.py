"""Governance actions on the champion: roll back to an earlier signed champion.

The champion's history is read from the audit log rather than from MLflow tags: the log is
hash-chained and verified on every read, whereas anyone with registry access can edit a tag. The
registry alias must agree with the log's last champion; if it does not, someone moved it outside
Quorum, and guessing which of the two to trust is exactly what a rollback must not do.

A rollback re-verifies the target (quorum with today's keys, provenance, file digests) before it
moves anything. It then writes a new champion statement with a higher sequence (``action:
rollback``), signed by the governance quorum (one key per approver, at least one of them allowed to
roll back), naming a version an earlier statement made champion; sites follow it exactly like a
promotion and refuse a rollback statement below the quorum. Publishing the statement, moving the alias,
tagging the versions and appending the audit entry form one Prefect transaction, like a promotion:
if any step fails the statement and the alias are put back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import transaction

from quorum.configs.errors import ChampionError
from quorum.flows.context import JobContext
from quorum.flows.promote import move_champion_alias, publish_statement
from quorum.lineage import champion
from quorum.lineage.anchor import sign_checkpoint
from quorum.lineage.audit import AuditEntry
from quorum.lineage.envelope import sign
from quorum.lineage.keys import rollback_signers
from quorum.lineage.provenance import provenance_digest
from quorum.lineage.registry import model_key, verify_version
from quorum.lineage.signing import QuorumResult, today_utc
from quorum.lineage.tracking import CHAMPION, alias_version, set_version_tags, version_tags

ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class RollbackResult:
    model_name: str
    from_version: str
    to_version: str
    approver: str  # the first signer governance allows to roll back: the audit entry's actor
    signers: tuple[str, ...]  # every approver who signed the rollback statement
    quorum: QuorumResult
    provenance_sha256: str


def champion_history(entries: Sequence[AuditEntry], model_name: str) -> list[str]:
    """The champion versions still on record, oldest first: a promotion pushes, a rollback pops."""
    history: list[str] = []
    for entry in entries:
        if entry.details.get("model") != model_name:
            continue
        if entry.event == "promotion" and history[-1:] != [str(entry.details["version"])]:
            history.append(str(entry.details["version"]))  # promoting the champion again changes nothing
        elif entry.event == "rollback":
            target = str(entry.details["to"])
            while history and history[-1] != target:
                history.pop()
            if not history:
                history.append(target)
    return history


def rollback_target(history: Sequence[str], current: str | None, to_version: str | None) -> str:
    """Which version a rollback makes champion again; refuses anything that was not an earlier champion.

    Rolling back "to" a version that never was champion would be a promotion without its gates.
    """
    if current is None:
        raise ChampionError("there is no champion to roll back", fix="promote a version first")
    if not history or history[-1] != current:
        recorded = f"v{history[-1]}" if history else "no champion"
        raise ChampionError(
            f"the champion alias points at v{current} but the audit log records {recorded}; "
            "the alias was moved outside Quorum",
            fix="check `quorum audit show` and the MLflow UI, then promote the intended version with `quorum approve`",
        )
    earlier = list(history[:-1])
    if not earlier:
        raise ChampionError(f"v{current} is the first champion; there is no earlier one", fix="nothing to roll back to")
    if to_version is None:
        return earlier[-1]
    if to_version not in earlier:
        raise ChampionError(
            f"v{to_version} is not an earlier champion (earlier champions still on record: "
            f"{', '.join('v' + v for v in earlier)})",
            fix=f"pass one of them with --to, or omit --to to return to v{earlier[-1]}",
        )
    return to_version


@task(cache_policy=NO_CACHE)
def record_rollback(ctx: JobContext, result: RollbackResult, reason: str, sequence: int) -> None:
    name = result.model_name
    set_version_tags(ctx.tracker, name, result.to_version, {"stage": CHAMPION, "rolled_back_from": result.from_version})
    set_version_tags(
        ctx.tracker, name, result.from_version, {"stage": ROLLED_BACK, "rolled_back_by": ",".join(result.signers)}
    )
    ctx.audit.append(
        "rollback",
        result.approver,
        {
            "model": name,
            "from": result.from_version,
            "to": result.to_version,
            "signers": list(result.quorum.valid_approvers),
            "provenance_sha256": result.provenance_sha256,
            "reason": reason,
            "statement_signers": list(result.signers),
            "statement_sequence": sequence,
        },
    )


@flow(name="rollback", validate_parameters=False)
def rollback_flow(
    ctx: JobContext, keys: Sequence[Path], to_version: str | None = None, reason: str = ""
) -> RollbackResult:
    """Make an earlier signed champion current again, signed with a quorum of approvers' private keys."""
    name = ctx.config.model_name
    today = today_utc()
    signing = rollback_signers(ctx.governance, list(keys), today)
    signers = tuple(signer for signer, _ in signing)
    current = alias_version(ctx.tracker, name, CHAMPION)
    target = rollback_target(champion_history(ctx.audit.entries(), name), current, to_version)
    assert current is not None  # rollback_target refuses a missing champion
    _require_registered(ctx, target)
    quorum = verify_version(ctx.store, ctx.governance, name, target, today)
    digest = provenance_digest(ctx.store.checkout(model_key(name, target)))
    result = RollbackResult(name, current, target, signers[0], signers, quorum, digest)
    payload = champion.new_payload(
        champion.chain_head(ctx.store, name), name, target, digest, champion.ROLLBACK, reason
    )
    signatures = tuple(sign(champion.KIND, payload, key, signer) for signer, key in signing)
    champion.verify_statement(ctx.store, ctx.governance, payload, signatures, today)
    with transaction() as txn:
        txn.set("ctx", ctx)
        publish_statement(ctx, payload, signatures)
        move_champion_alias(ctx, target)
        record_rollback(ctx, result, reason, int(payload["sequence"]))
    sign_checkpoint(ctx.audit, ctx.governance)
    get_run_logger().info("%s rolled %s back from v%s to v%s", ", ".join(signers), name, current, target)
    return result


def _require_registered(ctx: JobContext, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        version_tags(ctx.tracker, ctx.config.model_name, version)
    except MlflowException as exc:
        raise ChampionError(
            f"{ctx.config.model_name} v{version} is no longer in the model registry", fix="see `quorum ui`"
        ) from exc
