"""Model versions as files anyone can verify: fetch, sign, check the quorum, load.

A version's files are copied once from the MLflow registry into the artifact store; every
signature is over exactly those files, and nothing is loaded before the quorum verifies.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from configs.errors import SignatureError
from configs.schema import GovernanceConfig
from lineage.artifacts import LocalArtifactStore
from lineage.signing import QuorumResult, Signature, require_quorum, sign_model
from lineage.tracking import Tracker, download_version

if TYPE_CHECKING:
    from tasks.model import Weights


def model_key(name: str, version: str) -> str:
    return f"models/{name}/v{version}/files"


def signatures_key(name: str, version: str) -> str:
    return f"models/{name}/v{version}/signatures"


def fetch_files(tracker: Tracker, store: LocalArtifactStore, name: str, version: str) -> Path:
    """The version's model folder in the artifact store, downloaded on first use."""
    target = store.path(model_key(name, version))
    if target.is_dir():
        return target
    staging = target.with_name(".files.download")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    downloaded = download_version(tracker, name, version, staging)
    downloaded.rename(target) if downloaded != staging else staging.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def sign_version(
    store: LocalArtifactStore, name: str, version: str, keys: Sequence[tuple[str, Path]]
) -> list[Signature]:
    """Sign the version's files once per ``(approver, private key)``."""
    files = store.path(model_key(name, version))
    folder = store.path(signatures_key(name, version))
    folder.mkdir(parents=True, exist_ok=True)
    return [sign_model(files, key, folder / f"{approver}.sig", approver) for approver, key in keys]


def verify_version(store: LocalArtifactStore, governance: GovernanceConfig, name: str, version: str) -> QuorumResult:
    """Raise unless distinct approvers named in governance signed these exact files."""
    files = store.path(model_key(name, version))
    if not files.is_dir():
        raise SignatureError(
            f"no files for {name} version {version} in the artifact store", fix="run the promote stage again"
        )
    return require_quorum(files, store.path(signatures_key(name, version)), governance)


def load_verified_weights(
    tracker: Tracker, store: LocalArtifactStore, governance: GovernanceConfig, name: str, version: str
) -> Weights:
    """What a site does before using a model: fetch, verify the quorum, then load."""
    import mlflow.pytorch

    from tasks.model import get_weights

    files = fetch_files(tracker, store, name, version)
    verify_version(store, governance, name, version)
    model = mlflow.pytorch.load_model(str(files))
    return get_weights(model)
