"""An append-only, hash-chained audit log (one JSON object per line).

Each entry's hash covers its own fields and the previous entry's hash, so editing, deleting,
reordering or inserting a line breaks the chain at a line we can name. The chain cannot
detect lines cut off the end, nor an attacker who rewrites every later hash; anchor the
last hash somewhere else (e.g. a lineage tag) when that matters.

Appenders serialise on an ``flock``-ed side file rather than the log itself, so a lock is
never confused with content, and threads as well as processes exclude each other (flock
locks belong to the open file, not the process).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from quorum.configs.errors import AuditLogError

GENESIS_HASH = "0" * 64
_FIELDS: tuple[tuple[str, type], ...] = (
    ("index", int),
    ("timestamp", str),
    ("event", str),
    ("actor", str),
    ("details", dict),
    ("prev_hash", str),
    ("hash", str),
)
_FIX = "restore the log from a backup; the audit log must never be edited by hand"
_TAIL_CHUNK = 4096


@dataclass(frozen=True)
class AuditEntry:
    index: int
    timestamp: str
    event: str
    actor: str
    details: dict[str, object]
    prev_hash: str
    hash: str


class AuditLog:
    """The audit log at ``path``; the file is created by the first ``append``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def append(self, event: str, actor: str, details: Mapping[str, object]) -> AuditEntry:
        """Add one entry chained to the current last one, durable before this returns."""
        payload = _canonical(dict(details))  # fails early on values JSON cannot hold
        with self._locked(fcntl.LOCK_EX):
            last = self._last_entry()
            fields: dict[str, Any] = {
                "index": 0 if last is None else last.index + 1,
                "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
                "event": event,
                "actor": actor,
                "details": json.loads(payload),
                "prev_hash": GENESIS_HASH if last is None else last.hash,
            }
            entry = AuditEntry(**fields, hash=_entry_hash(fields))
            self._write_line(_canonical(asdict(entry)))
        return entry

    def entries(self) -> list[AuditEntry]:
        """All entries, checked: callers never act on a log that has been tampered with."""
        if not self.path.exists():
            return []
        with self._locked(fcntl.LOCK_SH):
            return _parse_chain(self.path, self._read_bytes())

    def verify(self) -> int:
        """Check the whole chain and return how many entries it holds."""
        return len(self.entries())

    @contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        """Hold ``operation`` on the lock file; a reader of a read-only copy goes without.

        Nobody can be appending to a log whose folder we may not even create a lock file in,
        so an auditor verifying an archived copy needs no lock.
        """
        try:
            if operation == fcntl.LOCK_EX:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            if operation == fcntl.LOCK_EX:
                raise
            yield
            return
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def _last_entry(self) -> AuditEntry | None:
        """Parse only the final line, so appends stay cheap however long the log grows.

        If that line is bad, the whole log is parsed instead, only to name the first bad line.
        """
        line = _last_line(self.path)
        if not line:
            return None
        if line.endswith(b"\n"):
            with suppress(AuditLogError):
                return _parse_line(self.path, 0, line[:-1])
        return _parse_chain(self.path, self._read_bytes())[-1]

    def _write_line(self, line: str) -> None:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            with os.fdopen(fd, "ab", closefd=False) as handle:
                handle.write(line.encode("utf-8") + b"\n")
                handle.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)


def _parse_chain(path: Path, data: bytes) -> list[AuditEntry]:
    lines = data.split(b"\n")
    if lines[-1]:
        raise AuditLogError(f"{path} line {len(lines)}: last line is incomplete (no newline at the end)", fix=_FIX)
    entries: list[AuditEntry] = []
    for number, raw in enumerate(lines[:-1], start=1):
        entry = _parse_line(path, number, raw)
        _check_link(path, number, entry, entries[-1] if entries else None)
        entries.append(entry)
    return entries


def _parse_line(path: Path, number: int, raw: bytes) -> AuditEntry:
    """Decode one line and check it is byte-for-byte the entry its hash vouches for."""
    where = f"{path} line {number}"
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise AuditLogError(f"{where} is not JSON ({exc}): a line was inserted or damaged", fix=_FIX) from None
    problem = _shape_problem(obj)
    if problem:
        raise AuditLogError(f"{where} is not an audit entry: {problem}", fix=_FIX)
    fields = {key: value for key, value in obj.items() if key != "hash"}
    if _entry_hash(fields) != obj["hash"] or _canonical(obj) != text:
        raise AuditLogError(f"{where} was edited: its content no longer matches its hash", fix=_FIX)
    return AuditEntry(**obj)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _check_link(path: Path, number: int, entry: AuditEntry, previous: AuditEntry | None) -> None:
    expected_index = 0 if previous is None else previous.index + 1
    if entry.index != expected_index:
        raise AuditLogError(
            f"{path} line {number}: expected entry {expected_index} but found entry {entry.index}; "
            "lines were deleted, reordered or inserted",
            fix=_FIX,
        )
    expected_prev = GENESIS_HASH if previous is None else previous.hash
    if entry.prev_hash != expected_prev:
        raise AuditLogError(
            f"{path} line {number}: broken chain, prev_hash does not match the hash of the line before; "
            "a line was replaced or inserted",
            fix=_FIX,
        )


def _shape_problem(obj: object) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    names = [name for name, _ in _FIELDS]
    if set(obj) != set(names):
        return f"fields are {sorted(obj)}, expected {sorted(names)}"
    wrong = [key for key, kind in _FIELDS if not isinstance(obj[key], kind) or isinstance(obj[key], bool)]
    if wrong:
        return f"wrong type for {', '.join(wrong)}"
    return None


def _entry_hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(fields).encode("utf-8")).hexdigest()


def _canonical(value: object) -> str:
    """One byte-exact JSON form per value, so a hash can be recomputed from the parsed line."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _last_line(path: Path) -> bytes:
    """The last line of ``path`` with its newline (if it has one), reading backwards in chunks."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return b""
    with handle:
        size = handle.seek(0, os.SEEK_END)
        start, data = size, b""
        while start > 0 and data.count(b"\n", 0, len(data) - 1) == 0:
            start = max(0, start - _TAIL_CHUNK)
            handle.seek(start)
            data = handle.read(size - start)
    return data[data.rfind(b"\n", 0, len(data) - 1) + 1 :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
