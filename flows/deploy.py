"""Site deployment: a site runs the champion only after verifying the very bytes it loads.

The site copies the champion's files and signatures into its own folder, checks the quorum (with
today's keys), the provenance and every file digest on that copy, and only then loads it. What it
runs is recorded at the site (``deployed/champion.json``: version and provenance digest) and in the
audit log; a refusal is audited too, with its reason, and leaves the previous deployment in place.
After ``quorum rollback`` the next deploy loads the earlier champion, because it follows the alias.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger

from quorum.configs.errors import ChampionError, SignatureError
from quorum.configs.schema import SiteConfig
from quorum.flows.context import JobContext, load_context
from quorum.lineage.provenance import provenance_digest
from quorum.lineage.registry import fetch_files, install_verified, load_weights
from quorum.lineage.tracking import CHAMPION, alias_version

DEPLOYED_DIR = "deployed"
RECORD_FILE = "champion.json"


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


def read_deployment(site: SiteConfig) -> Deployment | None:
    """The site's current deployment, or None if it never deployed."""
    path = deployed_record(site)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return Deployment(**{**data, "signers": tuple(data["signers"])})


def deploy_site(ctx: JobContext, site_id: str) -> Deployment:
    """Fetch the champion, verify it in the site's folder, load it, then record it as what the site runs."""
    site = ctx.config.site(site_id)
    name = ctx.config.model_name
    version = alias_version(ctx.tracker, name, CHAMPION)
    if version is None:
        raise ChampionError(f"{name} has no champion to deploy", fix="promote a version first (`quorum approve`)")
    fetch_files(ctx.tracker, ctx.store, name, version)
    target = site.root / DEPLOYED_DIR / name / f"v{version}"
    actor = f"site:{site_id}"
    try:
        quorum = install_verified(ctx.store, ctx.governance, name, version, target)
    except SignatureError as error:
        ctx.audit.append(
            "deployment_refused", actor, {"model": name, "version": version, "site": site_id, "reason": error.message}
        )
        raise
    weights = load_weights(target / "files")
    deployment = Deployment(
        site_id=site_id,
        model=name,
        version=version,
        provenance_sha256=provenance_digest(target / "files"),
        signers=quorum.valid_approvers,
        files=(target / "files").relative_to(site.root).as_posix(),
        num_tensors=len(weights),
        deployed_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_record(deployed_record(site), deployment)
    ctx.audit.append(
        "deployment",
        actor,
        {"model": name, "version": version, "site": site_id, "provenance_sha256": deployment.provenance_sha256},
    )
    return deployment


@flow(name="deploy", flow_run_name="deploy-{site_id}")
def deploy_flow(config_path: str, governance_path: str, site_id: str) -> Deployment:
    """One site's deployment; plain parameters so it can run on the site's own work pool."""
    ctx = load_context(config_path, governance_path)
    deployment = deploy_site(ctx, site_id)
    get_run_logger().info(
        "verified %s v%s at %s and loaded %d tensors",
        deployment.model,
        deployment.version,
        site_id,
        deployment.num_tensors,
    )
    return deployment


def _write_record(path: Path, deployment: Deployment) -> None:
    """Atomic, so a site never reads half a record about what it runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        temp.write_text(json.dumps(asdict(deployment), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
