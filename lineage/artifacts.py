"""The artifact store: content the coordinator and sites exchange, addressed by key, checked by sha256.

Two back ends behind one interface: a local folder (the embedded default) and S3 or any
S3-compatible service (``quorum.lineage.s3_store``). Writes are atomic, so a reader never sees half an
object, and every read can be checked against the digest recorded when it was written. Tools that
need a folder (model-signing, provenance) work on ``checkout(prefix)`` and write back with
``publish(prefix, folder)``; for the local store both are the store's own folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from quorum.configs.schema import FederationConfig, StorageConfig
from quorum.lineage.s3_store import S3ArtifactStore
from quorum.lineage.state import StateLayout
from quorum.lineage.store_base import (
    ArtifactCorrupt,
    ArtifactMissing,
    ArtifactStore,
    StoreUnavailable,
    check_key,
    file_sha256,
    sha256_bytes,
)

# the interface and errors live in store_base (below both back ends); callers keep importing them from here
__all__ = [
    "ArtifactCorrupt",
    "ArtifactMissing",
    "ArtifactStore",
    "LocalArtifactStore",
    "StoreUnavailable",
    "check_key",
    "federation_store",
    "file_sha256",
    "open_store",
    "sha256_bytes",
]


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


def open_store(storage: StorageConfig, local_root: Path, cache: Path) -> ArtifactStore:
    """The configured store: ``local_root`` unless ``storage.artifacts`` names an S3 location.

    ``cache`` is where S3 objects are mirrored for tools that need files; it is local to the
    process that opens the store (the coordinator's state folder, or a site's own folder).
    """
    if storage.artifacts is None:
        return LocalArtifactStore(local_root)
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
    state = StateLayout(config.state_dir)
    cache = state.root / "cache" if site_id is None else config.site(site_id).root / ".quorum-cache"
    return open_store(config.storage, state.artifacts, cache / "artifacts")
