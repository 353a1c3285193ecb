"""A promoted model's files as a site sees them: verified from the artifact store, loaded without MLflow.

Everything here is what a site process needs to trust and load a model: the version's folder and
signatures in the artifact store, the checks (quorum, provenance, the signed champion statement), a
verified copy in the site's own folder, and loading the weights with torch alone. No MLflow: a site
reads what the coordinator published to the artifact store when it promoted the version
(``quorum.lineage.registry`` does the copying from MLflow on the coordinator).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from quorum.configs.errors import ProvenanceError, SignatureError
from quorum.configs.schema import GovernanceConfig
from quorum.lineage.artifacts import ArtifactStore
from quorum.lineage.champion import ChampionStatement, read_current, verified_champion
from quorum.lineage.provenance import provenance_digest, verify_provenance
from quorum.lineage.signing import QuorumResult, require_quorum

if TYPE_CHECKING:
    from quorum.tasks.weights import Weights


def model_key(name: str, version: str) -> str:
    return f"models/{name}/v{version}/files"


def signatures_key(name: str, version: str) -> str:
    return f"models/{name}/v{version}/signatures"


def _present(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


@contextmanager
def naming_destination(staging: Path, destination: Path) -> Iterator[None]:
    """A check that fails on the staging copy names the destination instead.

    The staging folder's name is random; a service audits a refusal once per version and reason, so the
    same bad files must give the same reason at every poll (else every poll adds an audit entry).
    """
    try:
        yield
    except SignatureError as error:
        raise type(error)(error.message.replace(str(staging), str(destination)), fix=error.fix) from None


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
        with naming_destination(staging, destination):
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
    """Load a model folder's weights (torch only); call only on a folder that was just verified."""
    from quorum.tasks.model import get_weights
    from quorum.tasks.model_files import load_model_folder

    return get_weights(load_model_folder(files))


def load_champion(
    store: ArtifactStore, governance: GovernanceConfig, model: str, trust_file: Path
) -> tuple[ChampionStatement, Weights] | None:
    """The signed champion's weights, verified on a private copy; ``None`` when nothing was promoted yet.

    For a site that only reads the champion (monitoring): the statement must verify against governance
    and the site's trust record (which is left unchanged), and the files it names are copied to a
    temporary folder and verified there before they are loaded.
    """
    if read_current(store, model) is None:
        return None
    with tempfile.TemporaryDirectory(prefix="quorum-champion-") as scratch:
        statement, _, folder = install_champion(store, governance, model, trust_file, Path(scratch))
        return statement, load_weights(folder / "files")
