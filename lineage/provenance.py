"""In-toto provenance for a model version, bound to the model files by the approvers' signatures.

The statement is written as ``provenance.json`` *inside* the version's model folder before anyone
signs it, so every approval covers the model files and the claims about them at once: who cannot
forge a signature cannot change the claims either. It names the model and the version, so a
signature over one version never validates another, even when deterministic training produced
byte-identical weights. Verification re-hashes every file and compares the result with the
statement's subject, naming each file that was changed, added or removed.

Statement layout: https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quorum.configs.errors import ProvenanceError
from quorum.tasks.hashing import file_digest

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://quorum.dev/provenance/v1"
PROVENANCE_FILE = "provenance.json"
_FIX = "do not use this version: re-run the lifecycle, or restore the version's folder from a trusted copy"


@dataclass(frozen=True)
class SiteEvidence:
    """What a site proved about its data without sharing it: the DVC hash and the contract outcome."""

    site_id: str
    data_hash: str
    contract_passed: bool


@dataclass(frozen=True)
class BuildFacts:
    """The lineage of one trained model, as recorded by the job that produced it."""

    job_id: str
    config_hash: str
    git_commit: str
    mlflow_run_id: str
    mlflow_model_run_id: str
    sites: tuple[SiteEvidence, ...]
    verdict: Mapping[str, object]


def file_digests(files_dir: Path) -> dict[str, str]:
    """sha256 of every file below ``files_dir`` by relative POSIX path, the statement itself excepted.

    Symbolic links are refused, as model-signing does: a link could point at content that is
    never hashed here but is loaded later.
    """
    files_dir = Path(files_dir)
    if not files_dir.is_dir():
        raise ProvenanceError(f"model folder {files_dir} does not exist", fix=_FIX)
    digests: dict[str, str] = {}
    for path in sorted(files_dir.rglob("*")):
        name = path.relative_to(files_dir).as_posix()
        if path.is_symlink():
            raise ProvenanceError(f"{files_dir} holds a symbolic link {name}; models must be plain files", fix=_FIX)
        if path.is_file() and name != PROVENANCE_FILE:
            digests[name] = _sha256_file(path)
    return digests


def build_statement(files_dir: Path, model_name: str, version: str, facts: BuildFacts) -> dict[str, Any]:
    """An in-toto Statement v1 whose subject is every model file and whose predicate is its lineage."""
    subject = [{"name": name, "digest": {"sha256": digest}} for name, digest in file_digests(files_dir).items()]
    predicate: dict[str, Any] = {
        "model": {"name": model_name, "version": str(version)},
        "job_id": facts.job_id,
        "config_hash": facts.config_hash,
        "git_commit": facts.git_commit,
        "mlflow": {"run_id": facts.mlflow_run_id, "model_run_id": facts.mlflow_model_run_id},
        "sites": {
            s.site_id: {"data_hash": s.data_hash, "contract_passed": s.contract_passed}
            for s in sorted(facts.sites, key=lambda s: s.site_id)
        },
        "verdict": dict(facts.verdict),
    }
    return {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": PREDICATE_TYPE, "predicate": predicate}


def write_provenance(files_dir: Path, statement: Mapping[str, Any]) -> str:
    """Write the statement into the model folder atomically; return the sha256 of the bytes written.

    Must happen before signing: a statement written later would change the signed files.
    """
    files_dir = Path(files_dir)
    data = (json.dumps(statement, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    target = files_dir / PROVENANCE_FILE
    temp = files_dir / f".{PROVENANCE_FILE}.{secrets.token_hex(8)}.tmp"
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return hashlib.sha256(data).hexdigest()


def provenance_digest(files_dir: Path) -> str:
    """The sha256 a reviewer finds in the version's ``provenance.sha256`` tag."""
    path = Path(files_dir) / PROVENANCE_FILE
    if not path.is_file():
        raise ProvenanceError(f"no {PROVENANCE_FILE} in {files_dir}", fix=_FIX)
    return _sha256_file(path)


def verify_provenance(files_dir: Path, model_name: str, version: str) -> dict[str, Any]:
    """Return the statement if it is about ``model_name`` v``version`` and its subject is exactly the files.

    Run after the signatures verified: the statement is then authentic, and this check proves
    what it claims about the files still holds.
    """
    files_dir = Path(files_dir)
    statement = _read_statement(files_dir)
    where = f"provenance of {model_name} v{version} ({files_dir / PROVENANCE_FILE})"
    model = statement["predicate"]["model"]
    if (model.get("name"), str(model.get("version"))) != (model_name, str(version)):
        raise ProvenanceError(
            f"{where} names {model.get('name')} v{model.get('version')}, not {model_name} v{version}", fix=_FIX
        )
    problems = _subject_problems(statement["subject"], file_digests(files_dir))
    if problems:
        raise ProvenanceError(f"{where} does not match the files: {'; '.join(problems)}", fix=_FIX)
    return statement


def _read_statement(files_dir: Path) -> dict[str, Any]:
    path = files_dir / PROVENANCE_FILE
    if not path.is_file():
        raise ProvenanceError(f"no {PROVENANCE_FILE} in {files_dir}: the version has no provenance", fix=_FIX)
    try:
        statement = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ProvenanceError(f"{path} is not readable JSON: {exc}", fix=_FIX) from None
    problem = _shape_problem(statement)
    if problem:
        raise ProvenanceError(f"{path} is not a Quorum provenance statement: {problem}", fix=_FIX)
    result: dict[str, Any] = statement
    return result


def _shape_problem(statement: object) -> str | None:
    if not isinstance(statement, dict):
        return f"expected a JSON object, got {type(statement).__name__}"
    if statement.get("_type") != STATEMENT_TYPE:
        return f"_type is {statement.get('_type')!r}, expected {STATEMENT_TYPE!r}"
    if statement.get("predicateType") != PREDICATE_TYPE:
        return f"predicateType is {statement.get('predicateType')!r}, expected {PREDICATE_TYPE!r}"
    predicate, subject = statement.get("predicate"), statement.get("subject")
    if not isinstance(predicate, dict) or not isinstance(predicate.get("model"), dict):
        return "predicate.model is missing"
    if not isinstance(subject, list) or not all(_is_subject_entry(entry) for entry in subject):
        return "subject must be a list of {name, digest: {sha256}}"
    return None


def _is_subject_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("digest"), dict)
        and isinstance(entry["digest"].get("sha256"), str)
    )


def _subject_problems(subject: Sequence[Mapping[str, Any]], actual: Mapping[str, str]) -> list[str]:
    """Every difference between the claimed and the actual files, each naming its files."""
    names = [str(entry["name"]) for entry in subject]
    claimed = {str(entry["name"]): str(entry["digest"]["sha256"]) for entry in subject}
    problems = []
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"subject lists a file twice: {', '.join(repeated)}")
    checks = (
        ("changed", sorted(n for n in claimed.keys() & actual.keys() if claimed[n] != actual[n])),
        ("not in the statement (added)", sorted(actual.keys() - claimed.keys())),
        ("missing (removed)", sorted(claimed.keys() - actual.keys())),
    )
    problems += [f"{label}: {', '.join(found)}" for label, found in checks if found]
    return problems


def _sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")
