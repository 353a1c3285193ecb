"""Model versions as files anyone can verify: fetch, sign, check the quorum and provenance, load.

A version's files are copied once from the MLflow registry into the artifact store; its provenance
statement is written into that folder before anyone signs, so every signature is over exactly the
model files plus their provenance, and nothing is loaded before both verify.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from quorum.configs.errors import ProvenanceError, SignatureError
from quorum.configs.schema import GovernanceConfig
from quorum.lineage.artifacts import ArtifactStore
from quorum.lineage.champion import ChampionStatement, verified_champion
from quorum.lineage.provenance import provenance_digest, verify_provenance
from quorum.lineage.signing import QuorumResult, Signature, require_quorum, sign_model
from quorum.lineage.tracking import Tracker, download_version

if TYPE_CHECKING:
    from quorum.tasks.weights import Weights


def model_key(name: str, version: str) -> str:
    return f"models/{name}/v{version}/files"


def signatures_key(name: str, version: str) -> str:
    return f"models/{name}/v{version}/signatures"


def fetched_key(name: str, version: str) -> str:
    """Written after the last model file, so a half-copied version is never taken for a whole one."""
    return f"models/{name}/v{version}/files.complete"


def fetch_files(tracker: Tracker, store: ArtifactStore, name: str, version: str) -> Path:
    """The version's model folder from the artifact store, copied there from MLflow on first use."""
    key = model_key(name, version)
    if not store.exists(fetched_key(name, version)):
        with tempfile.TemporaryDirectory(prefix="quorum-fetch-") as staging:
            downloaded = download_version(tracker, name, version, Path(staging) / "files")
            store.publish(key, downloaded)
        store.put_json(fetched_key(name, version), {"model": name, "version": version})
    return store.checkout(key)


def _present(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def sign_version(store: ArtifactStore, name: str, version: str, keys: Sequence[tuple[str, Path]]) -> list[Signature]:
    """Sign the version's files once per ``(approver, private key)``."""
    files = store.checkout(model_key(name, version))
    folder = store.checkout(signatures_key(name, version))
    folder.mkdir(parents=True, exist_ok=True)
    signatures = [sign_model(files, key, folder / f"{approver}.sig", approver) for approver, key in keys]
    store.publish(signatures_key(name, version), folder)
    return signatures


def verify_files(
    files: Path, signatures: Path, governance: GovernanceConfig, name: str, version: str, now: date | None = None
) -> QuorumResult:
    """Raise unless a quorum signed these exact files and their provenance is about ``name`` v``version``.

    Signatures first: only once they hold is the provenance statement authentic enough to read.
    """
    quorum = require_quorum(files, signatures, governance, now)
    verify_provenance(files, name, version)
    return quorum


def verify_version(
    store: ArtifactStore, governance: GovernanceConfig, name: str, version: str, now: date | None = None
) -> QuorumResult:
    """``verify_files`` on the version's folder in the artifact store."""
    files = store.checkout(model_key(name, version))
    if not _present(files):
        raise SignatureError(
            f"no files for {name} version {version} in the artifact store", fix="run the promote stage again"
        )
    return verify_files(files, store.checkout(signatures_key(name, version)), governance, name, version, now)


def load_verified_weights(
    tracker: Tracker, store: ArtifactStore, governance: GovernanceConfig, name: str, version: str
) -> Weights:
    """What the coordinator does before using a model: fetch, verify quorum and provenance, then load."""
    files = fetch_files(tracker, store, name, version)
    verify_version(store, governance, name, version)
    return load_weights(files)


def install_verified(
    store: ArtifactStore, governance: GovernanceConfig, name: str, version: str, destination: Path
) -> QuorumResult:
    """Copy a version's files and signatures to ``destination`` and verify the copy there.

    What a site does: it verifies the very bytes it will load, in its own folder, so a later change
    to the shared store cannot reach a model already in use. ``destination`` appears only once its
    copy verified (built under a temporary name, then renamed over any earlier copy).
    """
    staging = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.tmp")
    try:
        for key, folder in ((model_key(name, version), "files"), (signatures_key(name, version), "signatures")):
            source = store.checkout(key)
            if not _present(source):
                raise SignatureError(
                    f"no {folder} for {name} version {version} in the artifact store", fix="run the promote stage again"
                )
            shutil.copytree(source, staging / folder, symlinks=True)
        quorum = verify_files(staging / "files", staging / "signatures", governance, name, version)
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return quorum


def install_champion(
    store: ArtifactStore, governance: GovernanceConfig, model: str, trust_file: Path, destination_root: Path
) -> tuple[ChampionStatement, QuorumResult, Path]:
    """What a site runs before it loads a champion: the signed statement, then the files it names.

    The statement must verify and be no older than the one ``trust_file`` recorded; the files it names
    are copied to ``destination_root/v<N>`` and verified there (quorum, provenance, every digest), and
    their provenance must be exactly the one the statement names. Returns the statement, the files'
    quorum and the verified folder; the caller records the statement (``remember_champion``) once the
    model loaded.
    """
    statement = verified_champion(store, governance, model, trust_file)
    target = destination_root / f"v{statement.version}"
    quorum = install_verified(store, governance, model, statement.version, target)
    installed = provenance_digest(target / "files")
    if installed != statement.provenance_sha256:
        raise ProvenanceError(
            f"{model} v{statement.version}'s provenance has sha256 {installed[:16]}..., but the signed champion "
            f"statement names {statement.provenance_sha256[:16]}...: the files were replaced",
            fix="keep the running model; restore the version's files from a trusted copy",
        )
    return statement, quorum, target


def load_weights(files: Path) -> Weights:
    """Load a model folder's weights; call only on a folder that was just verified."""
    import mlflow.pytorch

    from quorum.tasks.model import get_weights

    return get_weights(mlflow.pytorch.load_model(str(files)))
