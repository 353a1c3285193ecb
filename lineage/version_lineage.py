"""Everything one registered model version was made from, read from its signed provenance.

The facts come from the version's ``provenance.json`` (job, git commit, config hash, MLflow run, each
site's data hash and contract outcome, the verdict and its gates), which the approvers' signatures
cover. Registry tags and run artifacts (row counts, expectation counts) are display copies anyone with
registry access can edit: they are shown beside the signed facts, and every tag that disagrees with
the provenance is reported as a mismatch. ``build_lineage`` is pure; ``read_lineage`` reads MLflow
and the artifact store.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quorum.configs.errors import UnknownModelVersion
from quorum.configs.schema import GovernanceConfig
from quorum.lineage.artifacts import ArtifactStore
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
    signed: str = "unknown"
    mismatches: tuple[str, ...] = ()

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
        lines.append(f"  provenance   {self.signed}")
        lines += [f"  MISMATCH     {m}" for m in self.mismatches]
        return "\n".join(lines)


def build_lineage(
    model: str,
    version: str,
    provenance: Mapping[str, Any],
    tags: Mapping[str, str],
    fingerprints: Mapping[str, Any] | None,
    aliases: Sequence[str] = (),
    signed: str = "unknown",
) -> VersionLineage:
    """The version's facts from its provenance statement; tags and fingerprints only add display detail."""
    predicate = provenance.get("predicate", {})
    prints = fingerprints or {}
    sites_claimed: Mapping[str, Any] = predicate.get("sites", {})
    sites = tuple(
        _site(site_id, sites_claimed[site_id], tags, prints.get(site_id)) for site_id in sorted(sites_claimed)
    )
    verdict: Mapping[str, Any] = predicate.get("verdict", {})
    gates = tuple(
        GateLine(str(g.get("name", "?")), bool(g.get("passed")), str(g.get("reason", "")))
        for g in verdict.get("gates", [])
    )
    mlflow_run = str(predicate.get("mlflow", {}).get("run_id", "unknown"))
    facts = {
        "quorum.job_id": str(predicate.get("job_id", "unknown")),
        "git_commit": str(predicate.get("git_commit", "unknown")),
        "config_hash": str(predicate.get("config_hash", "unknown")),
        "mlflow_run": mlflow_run,
    }
    return VersionLineage(
        model=model,
        version=version,
        aliases=tuple(aliases),
        job_id=facts["quorum.job_id"],
        git_commit=facts["git_commit"],
        config_hash=facts["config_hash"],
        mlflow_run=mlflow_run,
        sites=sites,
        verdict="passed" if verdict.get("passed") else "failed",
        gates=gates,
        signed=signed,
        mismatches=tuple(tag_mismatches(tags, facts, sites_claimed)),
    )


def tag_mismatches(tags: Mapping[str, str], facts: Mapping[str, str], sites: Mapping[str, Any]) -> list[str]:
    """Every registry tag that disagrees with the signed provenance (tags are display copies)."""
    found = []
    expected = dict(facts)
    for site_id, claim in sites.items():
        expected[f"data.{site_id}"] = str(claim.get("data_hash"))
    for key, value in sorted(expected.items()):
        if key in tags and tags[key] != value:
            found.append(f"tag {key} = {tags[key]!r} but the signed provenance says {value!r}")
    for site_id, claim in sorted(sites.items()):
        tag = tags.get(f"contract.{site_id}")
        if tag is not None and tag.split(" ", 1)[0] != ("passed" if claim.get("contract_passed") else "failed"):
            found.append(
                f"tag contract.{site_id} = {tag!r} but the signed provenance says the contract "
                f"{'passed' if claim.get('contract_passed') else 'failed'}"
            )
    extra = sorted(k.split(".", 1)[1] for k in tags if k.startswith("data.") and k.split(".", 1)[1] not in sites)
    found += [f"tag data.{site_id} names a site the signed provenance does not list" for site_id in extra]
    return found


def _site(
    site_id: str, claim: Mapping[str, Any], tags: Mapping[str, str], fingerprint: Mapping[str, Any] | None
) -> SiteLineage:
    fp = fingerprint or {}
    if fp:
        rows = f"{fp.get('raw_rows', '?')} raw / {fp.get('train_rows', '?')} train / {fp.get('test_rows', '?')} test"
    else:
        rows = tags.get(f"rows.{site_id}", "unknown")
    outcome = "passed" if claim.get("contract_passed") else "failed"
    tag = tags.get(f"contract.{site_id}")
    detail = tag if tag is not None and tag.split(" ", 1)[0] == outcome else _contract_text(fp.get("contract"))
    contract = detail if detail.startswith(outcome) else outcome
    return SiteLineage(site_id, str(claim.get("data_hash", "unknown")), rows, contract)


def _contract_text(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return "unknown"
    evaluated = summary.get("evaluated", "?")
    if summary.get("passed"):
        return f"passed ({evaluated} expectations)"
    return f"failed ({len(summary.get('failed', []))} of {evaluated} expectations)"


def read_lineage(
    tracker: Tracker, store: ArtifactStore, governance: GovernanceConfig, model: str, version: str
) -> VersionLineage:
    """Read one version's lineage from its verified provenance, with the registry's copies beside it."""
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
    provenance, signed = signed_provenance(store, governance, model, version)
    parent = str(provenance["predicate"].get("mlflow", {}).get("run_id", ""))
    fingerprints = _run_dict(tracker, parent, "fingerprints.json") if parent else None
    return build_lineage(model, version, provenance, tags, fingerprints, aliases, signed)


def signed_provenance(
    store: ArtifactStore, governance: GovernanceConfig, model: str, version: str
) -> tuple[dict[str, Any], str]:
    """The version's provenance statement, checked against its files, and whether a quorum signed it."""
    from quorum.configs.errors import ProvenanceError, SignatureError
    from quorum.lineage.provenance import verify_provenance
    from quorum.lineage.registry import model_key, verify_version

    files = store.checkout(model_key(model, version))
    if not files.is_dir() or not any(files.iterdir()):
        raise ProvenanceError(
            f"{model} v{version} has no provenance in the artifact store (it was never promoted or approved)",
            fix="lineage is read from the signed provenance only: run `quorum approve` or the promote stage",
        )
    statement = verify_provenance(files, model, version)
    try:
        quorum = verify_version(store, governance, model, version)
        signed = f"signed by {', '.join(quorum.valid_approvers)} (quorum {quorum.required})"
    except SignatureError as error:
        if isinstance(error, ProvenanceError):
            raise
        signed = f"NOT signed by a quorum yet: {error.message.splitlines()[0]}"
    return statement, signed


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
