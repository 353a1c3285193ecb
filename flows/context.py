"""Everything one lifecycle job needs, resolved once from the config files the user passed.

Flows take plain parameters (paths, ids) so they render as forms in the Prefect UI and can run in
another process; each flow rebuilds its context from them.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from quorum.configs.schema import FederationConfig, GovernanceConfig, load_federation, load_governance
from quorum.lineage.artifacts import ArtifactStore, federation_store
from quorum.lineage.audit import AuditLog
from quorum.lineage.state import StateLayout, configure_environment
from quorum.lineage.tracking import Tracker, open_tracker


@dataclass(frozen=True)
class JobContext:
    config: FederationConfig
    governance: GovernanceConfig
    state: StateLayout
    tracker: Tracker
    store: ArtifactStore
    audit: AuditLog
    job_id: str

    def job_key(self, *parts: str) -> str:
        return "/".join(("jobs", self.job_id, *parts))


def new_job_id(config: FederationConfig) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{config.name}-{stamp}-{uuid.uuid4().hex[:6]}"


def load_context(config_path: str, governance_path: str, job_id: str | None = None) -> JobContext:
    config = load_federation(config_path)
    governance = load_governance(governance_path)
    state = StateLayout(config.state_dir)
    configure_environment(state)
    return JobContext(
        config=config,
        governance=governance,
        state=state,
        tracker=open_tracker(state, config.name),
        store=federation_store(config),
        audit=AuditLog(state.audit_log),
        job_id=job_id or new_job_id(config),
    )


def git_commit(folder: Path) -> str:
    """The code version for lineage; ``unknown`` outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=False, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = result.stdout.strip()
    if result.returncode != 0 or not commit:
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{commit}{'-dirty' if dirty else ''}"
