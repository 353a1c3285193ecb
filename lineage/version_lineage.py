"""Everything one registered model version was made from, read back from MLflow.

The registry entry's tags name the job, code and config and each site's data hash; the lifecycle's
parent run holds ``fingerprints.json`` (row counts and contract summaries per site) and its
``evaluate`` child run holds ``verdict.json``. ``build_lineage`` turns those three into one typed
value and is pure; ``read_lineage`` is the only function here that talks to MLflow.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quorum.configs.errors import UnknownModelVersion
from quorum.lineage.tracking import Tracker


@dataclass(frozen=True)
class SiteLineage:
    """One site's part in a version: its data version, how many rows, and what its contract said."""

    site_id: str
    data_hash: str
    rows: str
    contract: str


@dataclass(frozen=True)
class GateLine:
    name: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class VersionLineage:
    model: str
    version: str
    aliases: tuple[str, ...]
    job_id: str
    git_commit: str
    config_hash: str
    mlflow_run: str
    sites: tuple[SiteLineage, ...]
    verdict: str
    gates: tuple[GateLine, ...]

    def render(self) -> str:
        aliases = f" ({', '.join(self.aliases)})" if self.aliases else ""
        lines = [
            f"{self.model} v{self.version}{aliases}",
            f"  job          {self.job_id}",
            f"  git commit   {self.git_commit}",
            f"  config hash  {self.config_hash}",
            f"  MLflow run   {self.mlflow_run}",
            "  sites:",
        ]
        width = max((len(site.site_id) for site in self.sites), default=4)
        lines += [
            f"    {site.site_id:<{width}}  data {site.data_hash}  rows {site.rows}  contract {site.contract}"
            for site in self.sites
        ]
        lines.append(f"  verdict      {self.verdict}")
        lines += [f"    {'pass' if g.passed else 'FAIL'}  {g.name}: {g.reason}" for g in self.gates]
        return "\n".join(lines)


def build_lineage(
    model: str,
    version: str,
    tags: Mapping[str, str],
    fingerprints: Mapping[str, Any] | None,
    verdict: Mapping[str, Any] | None,
    aliases: Sequence[str] = (),
) -> VersionLineage:
    """Combine tags, fingerprints and verdict; a fact nobody recorded is shown as ``unknown``."""
    prints = fingerprints or {}
    site_ids = sorted(
        {key.split(".", 1)[1] for key in tags if key.startswith(("data.", "contract."))} | set(prints),
    )
    sites = tuple(_site(site_id, tags, prints.get(site_id)) for site_id in site_ids)
    gates = tuple(
        GateLine(str(g.get("name", "?")), bool(g.get("passed")), str(g.get("reason", "")))
        for g in (verdict or {}).get("gates", [])
    )
    return VersionLineage(
        model=model,
        version=version,
        aliases=tuple(aliases),
        job_id=tags.get("quorum.job_id", "unknown"),
        git_commit=tags.get("git_commit", "unknown"),
        config_hash=tags.get("config_hash", "unknown"),
        mlflow_run=tags.get("mlflow_run", "unknown"),
        sites=sites,
        verdict=_verdict_text(tags, verdict),
        gates=gates,
    )


def _site(site_id: str, tags: Mapping[str, str], fingerprint: Mapping[str, Any] | None) -> SiteLineage:
    fp = fingerprint or {}
    data_hash = tags.get(f"data.{site_id}") or fp.get("data_hash") or "none (not trained on)"
    if fp:
        rows = f"{fp.get('raw_rows', '?')} raw / {fp.get('train_rows', '?')} train / {fp.get('test_rows', '?')} test"
    else:
        rows = tags.get(f"rows.{site_id}", "unknown")
    contract = tags.get(f"contract.{site_id}") or _contract_text(fp.get("contract"))
    return SiteLineage(site_id, str(data_hash), rows, contract)


def _contract_text(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return "unknown"
    evaluated = summary.get("evaluated", "?")
    if summary.get("passed"):
        return f"passed ({evaluated} expectations)"
    return f"failed ({len(summary.get('failed', []))} of {evaluated} expectations)"


def _verdict_text(tags: Mapping[str, str], verdict: Mapping[str, Any] | None) -> str:
    if verdict is not None:
        return "passed" if verdict.get("passed") else "failed"
    return tags.get("verdict", "unknown")


def read_lineage(tracker: Tracker, model: str, version: str) -> VersionLineage:
    """Read one version's lineage from the registry and its runs."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        registered = client.get_registered_model(model)
    except MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none yet"
        raise UnknownModelVersion(
            f"no registered model {model!r} in {tracker.uri}", fix=f"registered models: {known}"
        ) from None
    try:
        entry = client.get_model_version(model, version)
    except MlflowException:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{model}'"))
        listed = ", ".join(map(str, versions)) or "none"
        raise UnknownModelVersion(f"{model} has no version {version!r}", fix=f"its versions: {listed}") from None
    tags = dict(entry.tags)
    aliases = sorted(alias for alias, number in registered.aliases.items() if str(number) == str(version))
    parent = tags.get("mlflow_run")
    fingerprints = _run_dict(tracker, parent, "fingerprints.json") if parent else None
    evaluate = _child_run(tracker, parent, "evaluate") if parent else None
    verdict = _run_dict(tracker, evaluate, "verdict.json") if evaluate else None
    return build_lineage(model, version, tags, fingerprints, verdict, aliases)


def _child_run(tracker: Tracker, parent_id: str, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        experiment = tracker.client.get_run(parent_id).info.experiment_id
        found = tracker.client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{parent_id}' and tags.mlflow.runName = '{name}'"
        )
    except MlflowException:
        return None
    return str(found[0].info.run_id) if found else None


def _run_dict(tracker: Tracker, run_id: str, artifact: str) -> dict[str, Any] | None:
    """A JSON artifact of a run, or ``None`` when the run or the file is gone."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="quorum-lineage-") as folder:
        try:
            local = tracker.client.download_artifacts(run_id, artifact, folder)
        except (MlflowException, OSError):
            return None
        data = json.loads(Path(local).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None
