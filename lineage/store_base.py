"""What every artifact store shares: the interface, key and digest rules, and the store's errors.

Below both back ends (``quorum.lineage.artifacts`` for a local folder, ``quorum.lineage.s3_store``
for S3) and below ``quorum.lineage.s3_errors``, so each of them imports this module and none imports
another's: the store modules form no cycle.
"""

from __future__ import annotations

import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import QuorumError
from quorum.tasks.hashing import file_digest


class ArtifactMissing(QuorumError, FileNotFoundError):
    headline = "Artifact not found"


class ArtifactCorrupt(QuorumError, ValueError):
    headline = "Artifact failed its checksum"


class StoreUnavailable(QuorumError, ConnectionError):
    headline = "Artifact store unreachable"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def check_key(key: str) -> str:
    """Keys are relative ``/``-separated paths; anything that could climb out of the store is refused."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"artifact key {key!r} is not a relative path inside the store")
    return key


class ArtifactStore(ABC):
    """What the round exchange, checkpoints, signing and monitoring need from a store."""

    location: str  # a path or URL naming the store, passed to site sessions and shown in messages
    # how often a waiting side looks for the other's next object: a file check is free, a request to
    # an object store is not (every HEAD is a billed round trip)
    poll_s: float = 0.02

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Write atomically; return the sha256 of ``data``."""

    @abstractmethod
    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        """Read, checking the digest recorded at write time and ``expected_sha256`` when given."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key below ``prefix`` (recursively), sorted."""

    @abstractmethod
    def put_file(self, key: str, source: Path) -> str:
        """Stream a file in (large models never sit whole in memory); return its sha256."""

    @abstractmethod
    def checkout(self, prefix: str) -> Path:
        """A local folder holding exactly the objects below ``prefix`` (empty if there are none)."""

    def publish(self, prefix: str, folder: Path) -> list[str]:
        """Write every file below ``folder`` under ``prefix``; return the keys written."""
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            self.put_file(key, path)
            keys.append(key)
        return keys

    def put_json(self, key: str, payload: object) -> str:
        return self.put_bytes(key, json.dumps(payload, indent=2, sort_keys=True).encode())

    def get_json(self, key: str) -> object:
        return json.loads(self.get_bytes(key))

    def put_weights(self, key: str, weights: Sequence[NDArray[np.float32]]) -> str:
        buffer = io.BytesIO()
        np.savez(buffer, *weights)
        return self.put_bytes(key, buffer.getvalue())

    def get_weights(self, key: str, expected_sha256: str | None = None) -> list[NDArray[np.float32]]:
        with np.load(io.BytesIO(self.get_bytes(key, expected_sha256)), allow_pickle=False) as archive:
            return [archive[f"arr_{i}"] for i in range(len(archive.files))]
