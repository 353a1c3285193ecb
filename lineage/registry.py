"""Model versions as files anyone can verify: fetch, sign, check the quorum and provenance, load.

A version's files are copied once from the MLflow registry into the artifact store; its provenance
statement is written into that folder before anyone signs, so every signature is over exactly the
model files plus their provenance, and nothing is loaded before both verify. This module is the
coordinator's side (it reaches MLflow); the checks and the loading, which sites use too, live in
``quorum.lineage.model_files`` and are re-exported here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from quorum.configs.schema import GovernanceConfig
from quorum.lineage.artifacts import ArtifactStore
from quorum.lineage.model_files import install_champion as install_champion
from quorum.lineage.model_files import install_verified as install_verified
from quorum.lineage.model_files import load_weights as load_weights
from quorum.lineage.model_files import model_key as model_key
from quorum.lineage.model_files import signatures_key as signatures_key
from quorum.lineage.model_files import verify_files as verify_files
from quorum.lineage.model_files import verify_version as verify_version
from quorum.lineage.signing import Signature, sign_model
from quorum.lineage.tracking import Tracker, download_version

if TYPE_CHECKING:
    from quorum.tasks.weights import Weights


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


def sign_version(store: ArtifactStore, name: str, version: str, keys: Sequence[tuple[str, Path]]) -> list[Signature]:
    """Sign the version's files once per ``(approver, private key)``."""
    files = store.checkout(model_key(name, version))
    folder = store.checkout(signatures_key(name, version))
    folder.mkdir(parents=True, exist_ok=True)
    signatures = [sign_model(files, key, folder / f"{approver}.sig", approver) for approver, key in keys]
    store.publish(signatures_key(name, version), folder)
    return signatures


def load_verified_weights(
    tracker: Tracker, store: ArtifactStore, governance: GovernanceConfig, name: str, version: str
) -> Weights:
    """What the coordinator does before using a model: fetch, verify quorum and provenance, then load."""
    files = fetch_files(tracker, store, name, version)
    verify_version(store, governance, name, version)
    return load_weights(files)
