"""Drift across the federation: each site's newest drift summary, one decision, and maybe a retraining run.

Each site's ``monitor`` deployment stores its summary in the artifact store under
``monitoring/<site>/<stamp>.json`` (``flows/site_flows.py``); this flow, on the coordinator pool,
reads the newest one per site (or, with ``check_sites``, runs the site checks in-process first, for
a federation without deployments), applies the pure ``retrain_decision`` (at least
``drift.min_sites_to_retrain`` sites drift) and, when ``trigger`` is on, starts the
``lifecycle/lifecycle`` deployment through Prefect with the reason as a parameter and the drifting
sites as tags, so the run shows in the UI with why it was started. Every trigger is written to the
audit log. The same summaries never trigger twice: a schedule that runs more often than the sites
report would otherwise start a retraining per tick for one piece of evidence.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from prefect import flow, get_run_logger

from quorum.configs.errors import NotDeployed, QuorumError, ReplyRejected
from quorum.configs.schema import FederationConfig, load_federation
from quorum.evaluation.drift import DriftSummary, retrain_decision, site_is_drifting
from quorum.lineage.artifacts import ArtifactStore, federation_store
from quorum.lineage.audit import AuditEntry, AuditLog
from quorum.lineage.state import StateLayout
from quorum.tasks.wire import decode_drift

LIFECYCLE_DEPLOYMENT = "lifecycle/lifecycle"
MONITORING = "monitoring"
TRIGGERED = "retraining_triggered"


@dataclass(frozen=True)
class DriftCheckResult:
    """What the check saw and did; ``evidence`` names the stored summary each site's verdict came from."""

    summaries: dict[str, DriftSummary]
    evidence: dict[str, str]
    unavailable: dict[str, str]
    retrain: bool
    reason: str
    drifting: tuple[str, ...] = ()
    triggered_run: str | None = None
    note: str = ""
    problems: dict[str, tuple[str, ...]] = field(default_factory=dict)


def summary_key(site_id: str, stamp: str) -> str:
    return f"{MONITORING}/{site_id}/{stamp}.json"


def newest_summaries(
    store: ArtifactStore, site_ids: Sequence[str]
) -> tuple[dict[str, DriftSummary], dict[str, str], dict[str, str]]:
    """Per site, its newest stored summary and its key, or why it has none that can be used."""
    summaries: dict[str, DriftSummary] = {}
    evidence: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    for site_id in site_ids:
        prefix = f"{MONITORING}/{site_id}"
        stamps = sorted(
            key.removeprefix(prefix + "/").removesuffix(".json")
            for key in store.list_keys(prefix)
            if key.endswith(".json") and key.count("/") == prefix.count("/") + 1
        )
        if not stamps:
            unavailable[site_id] = "no drift summary stored yet (its monitor deployment has not run)"
            continue
        key = summary_key(site_id, stamps[-1])
        try:
            summaries[site_id] = _read_summary(store, key, site_id)
            evidence[site_id] = key
        except QuorumError as error:
            unavailable[site_id] = f"{key}: {error.message}"
    return summaries, evidence, unavailable


def _read_summary(store: ArtifactStore, key: str, site_id: str) -> DriftSummary:
    try:
        data = store.get_json(key)
    except ValueError as exc:
        raise ReplyRejected(f"not JSON ({exc})", fix="the site's next monitor run replaces it") from None
    if not isinstance(data, Mapping):
        raise ReplyRejected("not a drift summary object", fix="the site's next monitor run replaces it")
    summary = decode_drift(data)
    if summary.site_id != site_id:
        raise ReplyRejected(f"stored under site {site_id} but names site {summary.site_id}", fix="check the store")
    return summary


def already_triggered(evidence: Mapping[str, str], history: Sequence[AuditEntry]) -> AuditEntry | None:
    """The last retraining trigger made on exactly this evidence, if the newest trigger was."""
    triggers = [entry for entry in history if entry.event == TRIGGERED]
    if triggers and triggers[-1].details.get("evidence") == dict(evidence):
        return triggers[-1]
    return None


def start_lifecycle(reason: str, drifting: Sequence[str], evidence: Mapping[str, str]) -> str:
    """Start the lifecycle deployment now and return its flow run id (without waiting for it).

    The idempotency key is derived from the evidence, so Prefect itself refuses to create a second
    run for the same summaries if two checks race.
    """
    import httpx
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    digest = hashlib.sha256(json.dumps(dict(evidence), sort_keys=True).encode()).hexdigest()[:16]
    try:
        run = run_deployment(
            LIFECYCLE_DEPLOYMENT,
            parameters={"reason": reason},
            flow_run_name=f"retrain: drift at {', '.join(drifting)}",
            tags=["retraining", "drift", *(f"drift:{site_id}" for site_id in drifting)],
            idempotency_key=f"drift-check-{digest}",
            timeout=0,
        )
    except ObjectNotFound:
        raise NotDeployed(
            f"the Prefect server has no deployment {LIFECYCLE_DEPLOYMENT} to start the retraining with",
            fix="run `quorum up` (it deploys infra/prefect.yaml), then check again",
        ) from None
    except httpx.HTTPError as exc:
        raise NotDeployed(
            f"the Prefect server did not accept the retraining run: {exc}",
            fix="check `quorum status`; `quorum up` starts the server and deploys the lifecycle",
        ) from exc
    return str(run.id)  # type: ignore[union-attr]  # the sync call returns a FlowRun


def _check_sites(config_path: str, governance_path: str, site_ids: Sequence[str]) -> dict[str, str]:
    """Run every site's monitor flow here; a site that cannot be checked is reported, not fatal."""
    from quorum.flows.site_flows import monitor_site_flow

    failures = {}
    for site_id in site_ids:
        try:
            monitor_site_flow(config_path, governance_path, site_id)
        except QuorumError as error:
            failures[site_id] = f"drift check failed: {error.message}"
    return failures


@flow(name="drift-check")
def drift_check_flow(
    config_path: str = "configs/federation.yaml",
    governance_path: str = "configs/governance.yaml",
    trigger: bool = False,
    check_sites: bool = False,
) -> DriftCheckResult:
    """Decide on retraining from every site's newest drift summary; start it when ``trigger`` is on."""
    logger = get_run_logger()
    config = load_federation(config_path)
    failed = _check_sites(config_path, governance_path, config.site_ids) if check_sites else {}
    store = federation_store(config)
    usable = [site_id for site_id in config.site_ids if site_id not in failed]
    summaries, evidence, unavailable = newest_summaries(store, usable)
    unavailable.update(failed)
    for site_id, why in unavailable.items():
        logger.warning("drift at %s unknown: %s", site_id, why)
    retrain, reason = retrain_decision(list(summaries.values()), config.drift)
    drifting = tuple(site_id for site_id, summary in summaries.items() if site_is_drifting(summary, config.drift))
    result = DriftCheckResult(
        summaries,
        evidence,
        unavailable,
        retrain,
        reason,
        drifting,
        problems={site_id: summary.problems for site_id, summary in summaries.items() if summary.problems},
    )
    logger.info("drift: %s", reason)
    if not (retrain and trigger):
        return result
    return _trigger(config, result)


def _trigger(config: FederationConfig, result: DriftCheckResult) -> DriftCheckResult:
    """Start the retraining unless these summaries already started one; audit what was started."""
    logger = get_run_logger()
    audit = AuditLog(StateLayout(config.state_dir).audit_log)
    evidence = {site_id: result.evidence[site_id] for site_id in result.drifting}
    previous = already_triggered(evidence, audit.entries())
    if previous is not None:
        note = f"retraining was already triggered for these summaries at {previous.timestamp} (audit #{previous.index})"
        logger.info(note)
        return _with(result, note=note)
    run_id = start_lifecycle(result.reason, result.drifting, evidence)
    audit.append(
        TRIGGERED,
        "drift-check",
        {
            "reason": result.reason,
            "sites": list(result.drifting),
            "evidence": evidence,
            "deployment": LIFECYCLE_DEPLOYMENT,
            "flow_run_id": run_id,
        },
    )
    logger.info("retraining triggered: %s flow run %s", LIFECYCLE_DEPLOYMENT, run_id)
    return _with(result, triggered_run=run_id, note=f"started {LIFECYCLE_DEPLOYMENT} flow run {run_id}")


def _with(result: DriftCheckResult, *, note: str, triggered_run: str | None = None) -> DriftCheckResult:
    return replace(result, note=note, triggered_run=triggered_run)


__all__ = ["DriftCheckResult", "already_triggered", "drift_check_flow", "newest_summaries", "start_lifecycle"]
