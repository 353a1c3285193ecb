"""Streaming file digests, shared by site preprocessing and the DVC adapter (md5, DVC's own choice) and
provenance (sha256).

The directory digest lives here, below the DVC adapter, because a site computes it for its data
fingerprint without running ``dvc``; ``lineage.dvc`` re-exports nothing and only records it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CHUNK_BYTES = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file read in 1 MiB chunks, so a multi-GiB model never sits in memory."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def directory_md5(folder: Path) -> str:
    """DVC 3's digest of a directory output: md5 of the sorted ``{md5, relpath}`` list, suffixed ``.dir``."""
    entries = sorted(
        ({"md5": file_md5(path), "relpath": path.relative_to(folder).as_posix()} for path in _files(folder)),
        key=lambda entry: entry["relpath"],
    )
    payload = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(payload).hexdigest() + ".dir"


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]
