"""Site deployment: a site runs the champion only after verifying the very bytes it loads.

The site trusts nothing it cannot check against governance and its own records (``deployed/trust.json``
in the site's folder):

1. governance: the file must chain, by the approvers' signatures, from the version the site accepted
   last (``quorum.lineage.governance_chain``);
2. the audit log must still hold the head the site witnessed at its last deploy;
3. the champion is the one the signed champion statement names (never the MLflow alias), with a
   sequence no lower than the highest the site has seen;
4. the files it names are copied into the site's folder and verified there: quorum (today's keys),
   provenance (the digest the statement names) and every file digest; only then are they loaded.

What it runs is recorded at the site (``deployed/champion.json``), the statement's sequence and the
newest audit head in ``deployed/trust.json``, and the deployment in the audit log. A refusal is audited
too, with its reason, and leaves the previous deployment in place. After ``quorum rollback`` the next
deploy loads the earlier champion, because the rollback wrote a newer statement naming it.

A deployment runs on the site's own worker and imports only site code: the model files come from the
artifact store (promotion put them there before anyone signed), never from MLflow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger

from quorum.configs.errors import SignatureError
from quorum.configs.schema import FederationConfig, GovernanceConfig, SiteConfig, load_federation, load_governance
from quorum.configs.site_pins import require_pinned
from quorum.lineage.anchor import check_anchors, witness, witnessed
from quorum.lineage.artifacts import ArtifactStore, federation_store
from quorum.lineage.audit import AuditLog
from quorum.lineage.champion import (
    remember_champion,
    require_backed_champion_events,
    verified_champion,
    write_json_atomically,
)
from quorum.lineage.governance_chain import trusted_governance
from quorum.lineage.model_files import install_champion, load_weights
from quorum.lineage.state import StateLayout, configure_environment

DEPLOYED_DIR = "deployed"
RECORD_FILE = "champion.json"
TRUST_FILE = "trust.json"


@dataclass(frozen=True)
class SiteContext:
    """What a site's deployment reads: no tracking store, since a site never talks to MLflow."""

    config: FederationConfig
    governance: GovernanceConfig
    store: ArtifactStore
    audit: AuditLog


def load_site_context(config_path: str, governance_path: str, site_id: str) -> SiteContext:
    require_pinned(config_path, governance_path)
    config = load_federation(config_path)
    state = StateLayout(config.state_dir)
    configure_environment(state)
    store = federation_store(config, site_id)  # as this site opens it: its own cache, its own credentials
    return SiteContext(config, load_governance(governance_path), store, AuditLog(state.audit_log))


@dataclass(frozen=True)
class Deployment:
    """What a site runs: written to the site's record after the model verified and loaded."""

    site_id: str
    model: str
    version: str
    provenance_sha256: str
    signers: tuple[str, ...]
    files: str
    num_tensors: int
    deployed_at: str


def deployed_record(site: SiteConfig) -> Path:
    return site.root / DEPLOYED_DIR / RECORD_FILE


def trust_record(site: SiteConfig) -> Path:
    """The site's own record of the newest governance, champion statement and audit head it accepted."""
    return site.root / DEPLOYED_DIR / TRUST_FILE


def read_deployment(site: SiteConfig) -> Deployment | None:
    """The site's current deployment, or None if it never deployed."""
    path = deployed_record(site)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return Deployment(**{**data, "signers": tuple(data["signers"])})


def deploy_site(ctx: SiteContext, site_id: str) -> Deployment:
    """Verify governance, the audit log and the signed statement, then install, load and record the champion."""
    site = ctx.config.site(site_id)
    name = ctx.config.model_name
    trust = trust_record(site)
    assert ctx.governance.source is not None
    governance = trusted_governance(ctx.governance.source, trust, ctx.config.governance_root)
    entries = ctx.audit.entries()
    check_anchors(entries, witnessed(trust, governance, f"site {site_id}"), ctx.audit.path)
    actor = f"site:{site_id}"
    try:
        statement = verified_champion(ctx.store, governance, name, trust)
        events = [(e.index, e.event, e.details) for e in entries]
        require_backed_champion_events(events, ctx.store, governance, name, ctx.audit.path)
        # the files are in the artifact store since promotion signed them: nothing is fetched from MLflow
        statement, quorum, target = install_champion(
            ctx.store, governance, name, trust, site.root / DEPLOYED_DIR / name
        )
    except SignatureError as error:
        ctx.audit.append("deployment_refused", actor, {"model": name, "site": site_id, "reason": error.message})
        raise
    weights = load_weights(target / "files")
    deployment = Deployment(
        site_id=site_id,
        model=name,
        version=statement.version,
        provenance_sha256=statement.provenance_sha256,
        signers=quorum.valid_approvers,
        files=(target / "files").relative_to(site.root).as_posix(),
        num_tensors=len(weights),
        deployed_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_record(deployed_record(site), deployment)
    remember_champion(trust, statement)
    ctx.audit.append(
        "deployment",
        actor,
        {
            "model": name,
            "version": statement.version,
            "site": site_id,
            "provenance_sha256": deployment.provenance_sha256,
            "statement_sequence": statement.sequence,
        },
    )
    witness(trust, ctx.audit, governance, f"site {site_id}")
    return deployment


@flow(name="deploy", flow_run_name="deploy-{site_id}")
def deploy_flow(config_path: str, governance_path: str, site_id: str) -> Deployment:
    """One site's deployment; plain parameters so it can run on the site's own work pool."""
    deployment = deploy_site(load_site_context(config_path, governance_path, site_id), site_id)
    get_run_logger().info(
        "verified %s v%s at %s and loaded %d tensors",
        deployment.model,
        deployment.version,
        site_id,
        deployment.num_tensors,
    )
    return deployment


def _write_record(path: Path, deployment: Deployment) -> None:
    write_json_atomically(path, asdict(deployment))
