"""The artifact store: content the coordinator and sites exchange, addressed by key, checked by sha256.

Writes are atomic (temp file then rename) so a reader never sees half an object, and every read
can be checked against the digest recorded when it was written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from configs.errors import QuorumError


class ArtifactMissing(QuorumError, FileNotFoundError):
    headline = "Artifact not found"


class ArtifactCorrupt(QuorumError, ValueError):
    headline = "Artifact failed its checksum"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalArtifactStore:
    """A folder-backed store; keys are ``/``-separated relative paths."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"artifact key {key!r} escapes the store")
        return path

    def put_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        return sha256_bytes(data)

    def get_bytes(self, key: str, expected_sha256: str | None = None) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise ArtifactMissing(f"no artifact {key!r} in {self.root}", fix="check the job id or run the job again")
        data = path.read_bytes()
        if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
            raise ArtifactCorrupt(f"artifact {key!r} does not match its recorded sha256", fix="re-run the round")
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def path(self, key: str) -> Path:
        """A local path for tools that need one (signing, MLflow)."""
        return self._path(key)

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
