"""The hash-chained audit log: every kind of tampering is caught and located by line."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from quorum.configs.errors import AuditLogError
from quorum.lineage.audit import GENESIS_HASH, AuditLog


def filled_log(tmp_path: Path, count: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    for number in range(count):
        log.append("promote", f"user{number}", {"model": "m", "version": number, "gates": {"auc": 0.81}})
    return log


def lines_of(log: AuditLog) -> list[str]:
    return log.path.read_text(encoding="utf-8").splitlines(keepends=True)


def rewrite(log: AuditLog, lines: list[str]) -> None:
    log.path.write_text("".join(lines), encoding="utf-8")


def append_many(path: str, actor: str, count: int) -> None:
    """Module level so a separate process can run it."""
    log = AuditLog(Path(path))
    for number in range(count):
        log.append("concurrent", actor, {"n": number})


def test_append_then_verify(tmp_path: Path) -> None:
    log = filled_log(tmp_path, 3)
    assert log.verify() == 3
    entries = log.entries()
    assert [e.index for e in entries] == [0, 1, 2]
    assert entries[0].prev_hash == GENESIS_HASH
    assert [e.prev_hash for e in entries[1:]] == [e.hash for e in entries[:-1]]
    assert entries[2].actor == "user2"
    assert entries[2].details == {"model": "m", "version": 2, "gates": {"auc": 0.81}}
    assert len(lines_of(log)) == 3


def test_append_returns_what_is_stored_and_hash_covers_all_other_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    entry = log.append("approve", "alice", {"signature": "alice.sig"})
    assert log.entries() == [entry]
    stored = json.loads(lines_of(log)[0])
    without_hash = {key: value for key, value in stored.items() if key != "hash"}
    canonical = json.dumps(without_hash, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert stored["hash"] == hashlib.sha256(canonical.encode()).hexdigest() == entry.hash


def test_empty_log_verifies_to_zero(tmp_path: Path) -> None:
    assert AuditLog(tmp_path / "never-written.jsonl").verify() == 0
    assert not (tmp_path / "never-written.jsonl").exists()
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert AuditLog(tmp_path / "empty.jsonl").verify() == 0


def test_edited_line_is_caught(tmp_path: Path) -> None:
    log = filled_log(tmp_path)
    lines = lines_of(log)
    lines[1] = lines[1].replace('"version":1', '"version":7')
    rewrite(log, lines)
    with pytest.raises(AuditLogError, match=r"line 2 was edited"):
        log.verify()


def test_reformatted_line_is_caught_even_with_same_content(tmp_path: Path) -> None:
    log = filled_log(tmp_path)
    lines = lines_of(log)
    lines[2] = json.dumps(json.loads(lines[2]), indent=None) + "\n"  # same data, different bytes
    rewrite(log, lines)
    with pytest.raises(AuditLogError, match=r"line 3 was edited"):
        log.verify()


def test_deleted_line_is_caught(tmp_path: Path) -> None:
    log = filled_log(tmp_path)
    lines = lines_of(log)
    del lines[1]
    rewrite(log, lines)
    with pytest.raises(AuditLogError, match=r"line 2: expected entry 1 but found entry 2"):
        log.verify()


def test_deleted_first_line_is_caught(tmp_path: Path) -> None:
    log = filled_log(tmp_path)
    rewrite(log, lines_of(log)[1:])
    with pytest.raises(AuditLogError, match=r"line 1: expected entry 0"):
        log.verify()


def test_swapped_lines_are_caught(tmp_path: Path) -> None:
    log = filled_log(tmp_path)
    lines = lines_of(log)
    lines[1], lines[2] = lines[2], lines[1]
    rewrite(log, lines)
    with pytest.raises(AuditLogError, match=r"line 2: .*deleted, reordered or inserted"):
        log.verify()


def test_inserted_copy_of_a_line_is_caught(tmp_path: Path) -> None:
    log = filled_log(tmp_path)
    lines = lines_of(log)
    lines.insert(2, lines[1])
    rewrite(log, lines)
    with pytest.raises(AuditLogError, match=r"line 3: expected entry 2 but found entry 1"):
        log.verify()


def test_inserted_self_consistent_entry_breaks_the_chain(tmp_path: Path) -> None:
    """A forger who hashes their entry correctly still cannot link it in without rewriting the rest."""
    log = filled_log(tmp_path)
    lines = lines_of(log)
    forged = json.loads(lines[1])
    forged.update(actor="mallory", prev_hash="f" * 64)
    forged.pop("hash")
    body = json.dumps(forged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    forged["hash"] = hashlib.sha256(body.encode()).hexdigest()
    lines[1] = json.dumps(forged, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    rewrite(log, lines)
    with pytest.raises(AuditLogError, match=r"line 2: broken chain"):
        log.verify()


@pytest.mark.parametrize("garbage", ["not json at all\n", "\n", "[1, 2]\n", '{"index": 0}\n'])
def test_garbage_line_is_caught(tmp_path: Path, garbage: str) -> None:
    log = filled_log(tmp_path)
    lines = lines_of(log)
    lines.insert(3, garbage)
    rewrite(log, lines)
    with pytest.raises(AuditLogError, match=r"line 4 is not (JSON|an audit entry)"):
        log.verify()


def test_torn_last_line_is_caught_and_blocks_appends(tmp_path: Path) -> None:
    log = filled_log(tmp_path, 2)
    log.path.write_bytes(log.path.read_bytes()[:-10])
    with pytest.raises(AuditLogError, match=r"line 2: last line is incomplete"):
        log.verify()
    with pytest.raises(AuditLogError, match=r"line 2"):
        log.append("promote", "bob", {})


def test_append_refuses_to_extend_a_tampered_tail(tmp_path: Path) -> None:
    log = filled_log(tmp_path, 3)
    lines = lines_of(log)
    lines[-1] = lines[-1].replace('"user2"', '"mallory"')
    rewrite(log, lines)
    before = log.path.read_bytes()
    with pytest.raises(AuditLogError, match=r"line 3 was edited"):
        log.append("promote", "bob", {})
    assert log.path.read_bytes() == before


def test_details_that_json_cannot_hold_are_refused_before_writing(tmp_path: Path) -> None:
    log = filled_log(tmp_path, 1)
    before = log.path.read_bytes()
    with pytest.raises(TypeError):
        log.append("promote", "bob", {"path": object()})
    with pytest.raises(ValueError):
        log.append("promote", "bob", {"score": float("nan")})
    assert log.path.read_bytes() == before


def test_long_log_appends_chain_from_the_last_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    big = {"blob": "x" * 5000}  # lines longer than the tail-read chunk
    for _ in range(5):
        log.append("big", "alice", big)
    assert log.verify() == 5


def test_concurrent_threads_do_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    threads = [threading.Thread(target=append_many, args=(str(path), f"t{n}", 20)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert AuditLog(path).verify() == 160


def test_concurrent_processes_do_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with ProcessPoolExecutor(max_workers=4, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(append_many, str(path), f"p{n}", 25) for n in range(4)]
        for future in futures:
            future.result()
    log = AuditLog(path)
    assert log.verify() == 100
    assert sorted(e.actor for e in log.entries()).count("p3") == 25
