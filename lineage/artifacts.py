"""The artifact store: content the coordinator and sites exchange, addressed by key, checked by sha256.

Two back ends behind one interface: a local folder (the embedded default) and S3 or any
S3-compatible service (``quorum.lineage.s3_store``). Writes are atomic, so a reader never sees half an
object, and every read can be checked against the digest recorded when it was written. Tools that
need a folder (model-signing, provenance) work on ``checkout(prefix)`` and write back with
``publish(prefix, folder)``; for the local store both are the store's own folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import QuorumError
from quorum.configs.schema import FederationConfig, StorageConfig
from quorum.tasks.hashing import file_digest


class ArtifactMissing(QuorumError, FileNotFoundError):
    headline = "Artifact not found"


class ArtifactCorrupt(QuorumError, ValueError):
    headline = "Artifact failed its checksum"


class StoreUnavailable(QuorumError, ConnectionError):
    headline = "Artifact store unreachable"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


class LocalArtifactStore(ArtifactStore):
    """A folder-backed store; keys are ``/``-separated relative paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
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

    def put_file(self, key: str, source: Path) -> str:
        path = self._path(key)
        if path == source.resolve():
            return file_sha256(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(path)
        return file_sha256(path)

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

    def list_keys(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        root = self.root.resolve()
        return sorted(
            p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
        )

    def checkout(self, prefix: str) -> Path:
        return self._path(prefix)

    def publish(self, prefix: str, folder: Path) -> list[str]:
        """A checkout is the store's own folder: publishing it back has nothing to copy (or hash)."""
        if folder.resolve() == self._path(prefix):
            return self.list_keys(prefix)
        return super().publish(prefix, folder)


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def open_store(storage: StorageConfig, local_root: Path, cache: Path) -> ArtifactStore:
    """The configured store: ``local_root`` unless ``storage.artifacts`` names an S3 location.

    ``cache`` is where S3 objects are mirrored for tools that need files; it is local to the
    process that opens the store (the coordinator's state folder, or a site's own folder).
    """
    if storage.artifacts is None:
        return LocalArtifactStore(local_root)
    from quorum.lineage.s3_store import S3ArtifactStore

    return S3ArtifactStore(
        storage.artifacts,
        cache=cache,
        endpoint_url=storage.endpoint_url,
        region=storage.region,
        multipart_threshold_mb=storage.multipart_threshold_mb,
        retry_deadline_s=storage.retry_deadline_s,
    )


def federation_store(config: FederationConfig, site_id: str | None = None) -> ArtifactStore:
    """The federation's store as the coordinator (``site_id`` None) or one site opens it.

    Each opener mirrors S3 objects into a cache of its own: the coordinator under its state folder,
    a site inside its own folder, so nothing a site fetches lands where another site could read it.
    """
    from quorum.lineage.state import StateLayout

    state = StateLayout(config.state_dir)
    cache = state.root / "cache" if site_id is None else config.site(site_id).root / ".quorum-cache"
    return open_store(config.storage, state.artifacts, cache / "artifacts")
