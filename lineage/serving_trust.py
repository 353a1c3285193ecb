"""The one check a site's service runs before it answers with a model version.

``verify_for_serving`` is the single entry point: the service calls nothing else to decide whether
a version may serve. A champion must be the version the signed champion statement names, no older
than the statement this site accepted before (``deployed/trust.json``), with a quorum of valid
approver signatures over its files and a provenance statement about exactly that version and those
files, whose digest the champion statement names (the check ``quorum deploy`` runs); a candidate
(shadow or canary traffic only) must carry the same provenance and at least one valid approver
signature, since it awaits the rest, and be newer than the champion: the candidate pointer that names
it (``quorum.lineage.candidate``) is unsigned, and without this check a rewritten pointer could send
canary traffic to an old version that an approver once signed. Both are checked on the site's
own copy, the very bytes that will be loaded. Nothing here reaches MLflow: the files come from the
artifact store, where promotion published them.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from quorum.configs.errors import QuorumNotMet, SignatureError
from quorum.configs.schema import GovernanceConfig
from quorum.lineage.artifacts import ArtifactStore
from quorum.lineage.candidate import version_number
from quorum.lineage.champion import remember_champion
from quorum.lineage.model_files import install_champion, model_key, naming_destination, signatures_key
from quorum.lineage.provenance import provenance_digest, verify_provenance
from quorum.lineage.signing import check_quorum

Role = Literal["champion", "candidate"]


class StaleCandidate(SignatureError):
    """A candidate no newer than the champion: a pointer turned back to a version already superseded."""

    headline = "Candidate is not newer than the champion"


@dataclass(frozen=True)
class VerifiedVersion:
    """A version whose copy at ``files`` verified for ``role``."""

    model: str
    version: str
    role: Role
    files: Path
    provenance_sha256: str
    signers: tuple[str, ...]


def verify_for_serving(
    store: ArtifactStore,
    governance: GovernanceConfig,
    name: str,
    version: str,
    destination: Path,
    role: Role,
    trust_file: Path,
    champion_version: str | None = None,
) -> VerifiedVersion:
    """Copy ``name`` v``version`` to ``destination`` and verify the copy for ``role``; raise ``SignatureError``.

    A champion's copy lands in ``destination``'s folder as ``v<N>``, named by the signed statement; the
    site then records the statement, so no older one is accepted afterwards. A candidate must be newer
    than ``champion_version`` (the champion the site follows; ``None`` when it has none yet)."""
    if role == "champion":
        statement, quorum, destination = install_champion(store, governance, name, trust_file, destination.parent)
        if statement.version != version:
            raise SignatureError(
                f"the signed champion statement names {name} v{statement.version}, not v{version}",
                fix="serve the version the champion statement names (`quorum status` shows it)",
            )
        remember_champion(trust_file, statement)
        signers = quorum.valid_approvers
    else:
        _require_newer(name, version, champion_version)
        signers = _install_candidate(store, governance, name, version, destination)
    files = destination / "files"
    return VerifiedVersion(name, version, role, files, provenance_digest(files), signers)


def _require_newer(name: str, version: str, champion_version: str | None) -> None:
    """Refuse a candidate that is not newer than the champion, before any of its files is copied.

    Promotion only ever names the newest registered version as candidate, and a champion was a candidate
    once, so a legitimate candidate is never older than the champion (equal, after its promotion, means
    no candidate: the service does not ask)."""
    if champion_version is not None and version_number(version) <= version_number(champion_version):
        raise StaleCandidate(
            f"candidate {name} v{version} is not newer than the champion v{champion_version}: the candidate "
            "pointer was turned back",
            fix="promote the candidate again (its promotion rewrites the pointer); no candidate serves until then",
        )


def _install_candidate(
    store: ArtifactStore, governance: GovernanceConfig, name: str, version: str, destination: Path
) -> tuple[str, ...]:
    staging = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.tmp")
    try:
        for key, folder in ((model_key(name, version), "files"), (signatures_key(name, version), "signatures")):
            source = store.checkout(key)
            if not source.is_dir() or not any(source.iterdir()):  # the site never fetches from MLflow
                raise SignatureError(
                    f"no {folder} for candidate {name} v{version} in the artifact store",
                    fix="run the promote stage again (it publishes the version's files and signatures)",
                )
            shutil.copytree(source, staging / folder, symlinks=True)
        with naming_destination(staging, destination):
            quorum = check_quorum(staging / "files", staging / "signatures", governance)
            if not quorum.valid_approvers:
                rejected = "; ".join(f"{file} ({reason})" for file, reason in quorum.rejected) or "no signature"
                raise QuorumNotMet(
                    f"candidate {name} v{version} has no valid approver signature: {rejected}",
                    fix="a candidate serves shadow or canary traffic only once an approver signed it",
                )
            verify_provenance(staging / "files", name, version)
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return quorum.valid_approvers
