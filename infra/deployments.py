"""Rendering ``infra/prefect.yaml`` from a federation config.

The file is what ``quorum up`` deploys and what a user edits: one pool per site (``site-<id>``)
with that site's session, preprocessing and monitoring deployments, and on the ``coordinator`` pool
the lifecycle with the retraining schedule and the drift check that retrains on drift. Paths are
written as ``{{ $QUORUM_PROJECT }}`` placeholders that Prefect fills from the environment at deploy
time, so the file is the same on every machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from quorum.configs.schema import FederationConfig

COORDINATOR_POOL = "coordinator"
PROJECT_VAR = "{{ $QUORUM_PROJECT }}"


def site_pool(site_id: str) -> str:
    return f"site-{site_id}"


def _portable(path: Path, project: Path) -> str:
    try:
        return f"{PROJECT_VAR}/{path.resolve().relative_to(project.resolve()).as_posix()}"
    except ValueError:
        return str(path.resolve())


def render(config: FederationConfig, governance_path: Path, project: Path, approver_keys: list[Path]) -> dict[str, Any]:
    """The prefect.yaml document for this federation."""
    assert config.source is not None
    config_path = _portable(config.source, project)
    governance = _portable(governance_path, project)
    deployments: list[dict[str, Any]] = [
        {
            "name": "lifecycle",
            "description": "The whole lifecycle, every site on its own pool. Scheduled retraining.",
            "entrypoint": "quorum.flows.lifecycle:lifecycle",
            "work_pool": {"name": COORDINATOR_POOL, "job_variables": {"working_dir": PROJECT_VAR}},
            "parameters": {
                "config_path": config_path,
                "governance_path": governance,
                "runner": "pool",
                "approver_keys": [_portable(k, project) for k in approver_keys],
            },
            "schedules": [{"cron": config.deployment.retrain_cron, "timezone": "UTC", "active": True}],
        },
        {
            "name": "drift-check",
            "description": (
                "Reads every site's newest drift summary; starts the lifecycle when at least "
                f"drift.min_sites_to_retrain ({config.drift.min_sites_to_retrain}) sites drift."
            ),
            "entrypoint": "quorum.flows.drift_check:drift_check_flow",
            "work_pool": {"name": COORDINATOR_POOL, "job_variables": {"working_dir": PROJECT_VAR}},
            "parameters": {"config_path": config_path, "governance_path": governance, "trigger": True},
            "schedules": [{"interval": config.deployment.monitor_interval_s, "active": True}],
        },
    ]
    for site in config.sites:
        pool = {"name": site_pool(site.id), "job_variables": {"working_dir": _portable(site.root, project)}}
        deployments += [
            {
                "name": f"session-{site.id}",
                "description": f"Serves one training job at site {site.id} (started by the lifecycle).",
                "entrypoint": "quorum.flows.runners.site_session:site_session",
                "work_pool": dict(pool),
            },
            {
                "name": f"preprocess-{site.id}",
                "description": f"Validate and prepare site {site.id}'s data; only its fingerprint leaves.",
                "entrypoint": "quorum.flows.site_flows:preprocess_site_flow",
                "work_pool": dict(pool),
                "parameters": {"config_path": config_path, "site_id": site.id},
            },
            {
                "name": f"monitor-{site.id}",
                "description": f"Drift at site {site.id}; only the summary leaves.",
                "entrypoint": "quorum.flows.site_flows:monitor_site_flow",
                "work_pool": dict(pool),
                "parameters": {"config_path": config_path, "governance_path": governance, "site_id": site.id},
                "schedules": [{"interval": config.deployment.monitor_interval_s, "active": True}],
            },
            {
                "name": f"deploy-{site.id}",
                "description": f"Verify the champion's signatures and provenance at site {site.id}, then load it.",
                "entrypoint": "quorum.flows.deploy:deploy_flow",
                "work_pool": dict(pool),
                "parameters": {"config_path": config_path, "governance_path": governance, "site_id": site.id},
            },
            {
                "name": f"serve-{site.id}",
                "description": f"Answer inference requests at site {site.id} with the verified champion (127.0.0.1).",
                "entrypoint": "quorum.flows.serve:serve_flow",
                "work_pool": dict(pool),
                "parameters": {"config_path": config_path, "governance_path": governance, "site_id": site.id},
            },
        ]
    return {"name": "quorum", "prefect-version": "3", "pull": [], "deployments": deployments}


HEADER = """\
# Prefect deployments of this federation, deployed by `quorum up` (prefect deploy --all).
# Rendered from the federation config by `quorum infra render`; edit schedules and parameters here
# or in the config and render again. {{ $QUORUM_PROJECT }} is the project folder (set by quorum up).
"""


class _PlainDumper(yaml.SafeDumper):
    """Spell every deployment out in full: anchors and aliases would puzzle a reader editing the file."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write(document: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(HEADER + yaml.dump(document, Dumper=_PlainDumper, sort_keys=False, width=120))
    tmp.replace(path)
