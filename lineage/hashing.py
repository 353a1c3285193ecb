"""Streaming file digests, shared by the DVC adapter (md5, DVC's own choice) and provenance (sha256)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK_BYTES = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file read in 1 MiB chunks, so a multi-GiB model never sits in memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
