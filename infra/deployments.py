"""Rendering ``infra/prefect.yaml`` from a federation config, and applying it to a Prefect server.

The file is what ``quorum up`` deploys and what a user edits: one pool per site (``site-<id>``)
with that site's session, preprocessing and monitoring deployments, and on the ``coordinator`` pool
the lifecycle with the retraining schedule and the drift check that retrains on drift. Paths are
written as ``{{ $QUORUM_PROJECT }}`` placeholders that Prefect fills from the environment at deploy
time, so the file is the same on every machine.

``prepare`` reads each flow's name and parameter schema from its source (no flow is called; Prefect
only evaluates the module's imports to resolve annotations), and ``apply`` then creates (or updates)
every deployment of the file through the Prefect API in one pass. The ``prefect deploy`` command
imports every flow module, MLflow among them, and only then starts talking to the server.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from quorum.configs.errors import ToolError
from quorum.configs.schema import FederationConfig

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import DeploymentScheduleCreate

COORDINATOR_POOL = "coordinator"
PROJECT_VAR = "{{ $QUORUM_PROJECT }}"
# a site flow run's process hands its run to the site run starter, or becomes `python -m prefect.engine`
SITE_RUN_COMMAND = "{{ $QUORUM_PYTHON }} -m quorum.infra.start_run"


def site_pool(site_id: str) -> str:
    return f"site-{site_id}"


def _portable(path: Path, project: Path) -> str:
    try:
        return f"{PROJECT_VAR}/{path.resolve().relative_to(project.resolve()).as_posix()}"
    except ValueError:
        return str(path.resolve())


def render(config: FederationConfig, governance_path: Path, project: Path) -> dict[str, Any]:
    """The prefect.yaml document for this federation.

    It names no private key: a scheduled or UI-started lifecycle registers and verifies a candidate,
    then pauses awaiting approval; approvers sign with `quorum approve` on their own machines.
    """
    assert config.source is not None
    config_path = _portable(config.source, project)
    governance = _portable(governance_path, project)
    deployments: list[dict[str, Any]] = [
        {
            "name": "lifecycle",
            "description": (
                "The whole lifecycle, every site on its own pool. Scheduled retraining: the run pauses "
                "awaiting approval (`quorum approve`) once its candidate is verified."
            ),
            "entrypoint": "quorum.flows.lifecycle:lifecycle",
            "work_pool": {"name": COORDINATOR_POOL, "job_variables": {"working_dir": PROJECT_VAR}},
            "parameters": {
                "config_path": config_path,
                "governance_path": governance,
                "runner": "pool",
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
        pool = {
            "name": site_pool(site.id),
            "job_variables": {"working_dir": _portable(site.root, project), "command": SITE_RUN_COMMAND},
        }
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
# Prefect deployments of this federation, deployed by `quorum up` (through the Prefect API, in one pass).
# Rendered from the federation config by `quorum infra render`; edit schedules and parameters here
# or in the config and render again. {{ $QUORUM_PROJECT }} is the project folder and {{ $QUORUM_PYTHON }} its
# Python (both filled in by quorum up).
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


_ENV_PLACEHOLDER = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _fill(value: Any, project: Path) -> Any:
    """``{{ $NAME }}`` placeholders filled from the environment as Prefect does, ``QUORUM_PROJECT`` the
    project and ``QUORUM_PYTHON`` this interpreter (the project's virtual environment)."""
    if isinstance(value, str):
        env = {**os.environ, "QUORUM_PROJECT": str(project), "QUORUM_PYTHON": sys.executable}
        return _ENV_PLACEHOLDER.sub(lambda match: env.get(match.group(1), match.group(0)), value)
    if isinstance(value, list):
        return [_fill(item, project) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, project) for key, item in value.items()}
    return value


def _source_entrypoint(entrypoint: str) -> str:
    """``package.module:flow`` as ``/path/to/module.py:flow``, found without importing the module."""
    module, _, function = entrypoint.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ToolError(f"entrypoint {entrypoint}: no module {module}", fix="fix the entrypoint in the prefect file")
    return f"{spec.origin}:{function}"


def _schedules(entries: list[dict[str, Any]]) -> list[DeploymentScheduleCreate]:
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    schedules = []
    for entry in entries:
        if "cron" in entry:
            schedule: CronSchedule | IntervalSchedule = CronSchedule(cron=entry["cron"], timezone=entry.get("timezone"))
        elif "interval" in entry:
            schedule = IntervalSchedule(interval=timedelta(seconds=float(entry["interval"])))
        else:
            raise ToolError(f"schedule {entry} has neither cron nor interval", fix="fix it in the prefect file")
        schedules.append(DeploymentScheduleCreate(schedule=schedule, active=bool(entry.get("active", True))))
    return schedules


@dataclass(frozen=True)
class PreparedDeployment:
    """One deployment of a prefect.yaml document, with its flow's name and parameter schema read from source."""

    flow_name: str
    name: str
    entrypoint: str
    description: str | None
    work_pool: str | None
    job_variables: dict[str, Any]
    parameters: dict[str, Any]
    parameter_schema: dict[str, Any]
    schedules: tuple[dict[str, Any], ...]
    pull_steps: tuple[dict[str, Any], ...]
    tags: tuple[str, ...]


def prepare(document: dict[str, Any], project: Path) -> list[PreparedDeployment]:
    """Everything ``apply`` sends, computed without a server (it reads each flow's source once).

    Prefect evaluates a flow module's imports to resolve its annotations, which for the site session
    means torch: ``quorum up`` does this while the servers start, off the path to a ready stack.
    """
    from prefect.flows import load_flow_arguments_from_entrypoint
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    flows: dict[str, tuple[str, dict[str, Any]]] = {}  # entrypoint -> (flow name, parameter schema)
    prepared = []
    for deployment in _fill(document.get("deployments") or [], project):
        if not isinstance(deployment, dict) or not deployment.get("name") or not deployment.get("entrypoint"):
            raise ToolError(
                f"a deployment in the prefect file lacks its name or entrypoint: {deployment!r}",
                fix="give every deployment a `name` and an `entrypoint` (module:flow), or run `quorum infra render`",
            )
        entrypoint = str(deployment["entrypoint"])
        if entrypoint not in flows:
            source = _source_entrypoint(entrypoint)
            try:
                flow_name = str(load_flow_arguments_from_entrypoint(source, {"name"}).get("name") or entrypoint)
                schema = parameter_schema_from_entrypoint(source).model_dump_for_openapi()
            except (ValueError, SyntaxError) as exc:
                fix = "fix the entrypoint in the prefect file"
                raise ToolError(f"entrypoint {entrypoint}: {exc}", fix=fix) from None
            flows[entrypoint] = (flow_name, schema)
        flow_name, schema = flows[entrypoint]
        pool = deployment.get("work_pool") or {}
        prepared.append(
            PreparedDeployment(
                flow_name=flow_name,
                name=str(deployment["name"]),
                entrypoint=entrypoint,
                description=deployment.get("description"),
                work_pool=pool.get("name"),
                job_variables=pool.get("job_variables") or {},
                parameters=deployment.get("parameters") or {},
                parameter_schema=schema,
                schedules=tuple(deployment.get("schedules") or ()),
                pull_steps=tuple(document.get("pull") or ()),
                tags=tuple(deployment.get("tags") or ()),
            )
        )
    return prepared


def apply(prepared: list[PreparedDeployment], client: SyncPrefectClient) -> list[str]:
    """Create or update every prepared deployment; returns their ``flow/deployment`` names."""
    flow_ids: dict[str, Any] = {}
    names = []
    for deployment in prepared:
        if deployment.flow_name not in flow_ids:
            flow_ids[deployment.flow_name] = client.create_flow_from_name(deployment.flow_name)
        client.create_deployment(
            flow_id=flow_ids[deployment.flow_name],
            name=deployment.name,
            description=deployment.description,
            entrypoint=deployment.entrypoint,
            work_pool_name=deployment.work_pool,
            job_variables=dict(deployment.job_variables),
            parameters=dict(deployment.parameters),
            parameter_openapi_schema=deployment.parameter_schema,
            schedules=_schedules(list(deployment.schedules)),
            pull_steps=list(deployment.pull_steps),
            tags=list(deployment.tags),
        )
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names
