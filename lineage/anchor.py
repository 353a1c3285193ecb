"""Anchors for the audit log's head: signed checkpoints and the sites that witness them.

The hash chain (``quorum.lineage.audit``) catches an edit inside the log but not a cut-off tail, a
deleted file or a wholesale re-chained copy. Two anchors, as Certificate Transparency uses signed
tree heads and witnesses, catch those:

- **Checkpoints**: the coordinator signs ``{index, hash}`` of the newest entry with the checkpoint key
  that ``governance.yaml`` pins (``checkpoints:``), after every governance event. The private key is
  read from ``$QUORUM_CHECKPOINT_KEY``, else from the ``.key`` file beside the pinned public key;
  without one no checkpoint is written (and ``audit verify`` says so).
- **Witnesses**: each site, when it deploys, checks that the log still holds the head it witnessed
  last time, then records the new head and the newest valid checkpoint in its own folder.

``check_anchors`` requires the chain to hold every anchor's entry with the anchored hash, so a
truncation, tail edit, deleted log or re-chained copy older than the newest anchor is reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from quorum.configs.errors import AuditLogError
from quorum.configs.schema import GovernanceConfig
from quorum.lineage.audit import AuditEntry, AuditLog
from quorum.lineage.champion import read_trust, write_trust
from quorum.lineage.envelope import check_with_key, envelope, parse_envelope, sign

KIND = "checkpoint"
SIGNER = "coordinator"
KEY_ENV = "QUORUM_CHECKPOINT_KEY"
_FIX = (
    "the audit log was cut short, replaced or rewritten: restore it from a backup or a site's copy, "
    "and treat the coordinator's state folder as compromised"
)


@dataclass(frozen=True)
class Anchor:
    """One point the log must still contain: entry ``index`` with ``hash``, and who vouches for it."""

    index: int
    hash: str
    source: str


def checkpoint_path(audit: AuditLog) -> Path:
    return audit.path.with_name(audit.path.name + ".checkpoint.json")


def private_checkpoint_key(governance: GovernanceConfig) -> Path | None:
    """Where the coordinator's checkpoint key is, or None when this host cannot sign checkpoints."""
    if governance.checkpoints is None:
        return None
    named = os.environ.get(KEY_ENV)
    path = Path(named) if named else governance.checkpoints.public_key.with_suffix(".key")
    return path if path.is_file() else None


def sign_checkpoint(audit: AuditLog, governance: GovernanceConfig) -> dict[str, Any] | None:
    """Sign the current head (after checking the whole chain) and store it; None without a key or entries."""
    key = private_checkpoint_key(governance)
    entries = audit.entries()
    if key is None or not entries:
        return None
    head = entries[-1]
    payload = {
        "type": KIND,
        "index": head.index,
        "hash": head.hash,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    document = envelope(payload, [sign(KIND, payload, key, SIGNER)])
    path = checkpoint_path(audit)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(document, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, path)
    return document


def verified_checkpoint(document: object, governance: GovernanceConfig, source: str) -> Anchor:
    """The anchor a checkpoint vouches for; a checkpoint the pinned key did not sign is an error."""
    if governance.checkpoints is None:
        raise AuditLogError(
            f"{source} holds a checkpoint but governance pins no checkpoint key",
            fix="add the coordinator's key under `checkpoints:` in governance.yaml",
        )
    try:
        payload, signatures = parse_envelope(document)
        index, head = payload["index"], payload["hash"]
        if payload.get("type") != KIND or not isinstance(index, int) or not isinstance(head, str):
            raise ValueError("not a checkpoint")
    except (ValueError, KeyError) as exc:
        raise AuditLogError(f"{source}: malformed checkpoint ({exc})", fix=_FIX) from None
    pinned = governance.checkpoints
    problems = [check_with_key(KIND, payload, s, pinned.public_key, pinned.fingerprint) for s in signatures]
    if not signatures or all(problems):
        reason = next((p for p in problems if p), "no signature")
        raise AuditLogError(
            f"{source}: checkpoint of entry {index} is not signed by the pinned key: {reason}", fix=_FIX
        )
    return Anchor(index, head, source)


def read_checkpoint(audit: AuditLog, governance: GovernanceConfig) -> Anchor | None:
    path = checkpoint_path(audit)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AuditLogError(f"{path} is not JSON: {exc}", fix=_FIX) from None
    return verified_checkpoint(document, governance, str(path))


def check_anchors(entries: list[AuditEntry], anchors: Iterable[Anchor], where: Path) -> None:
    """Raise unless the chain still holds every anchored entry with its anchored hash."""
    for anchor in anchors:
        if anchor.index >= len(entries):
            raise AuditLogError(
                f"{where} ends at entry {len(entries) - 1} but {anchor.source} vouches for entry {anchor.index}: "
                "entries were cut off the end (or the log was deleted)",
                fix=_FIX,
            )
        if entries[anchor.index].hash != anchor.hash:
            raise AuditLogError(
                f"{where} entry {anchor.index} differs from the one {anchor.source} vouches for: "
                "the log was rewritten and re-chained",
                fix=_FIX,
            )


def witnessed(trust_file: Path, governance: GovernanceConfig, source: str) -> list[Anchor]:
    """The anchors a site recorded: the head it saw and the checkpoint it held."""
    record = read_trust(trust_file).get("audit")
    if not isinstance(record, Mapping):
        return []
    anchors = []
    if isinstance(record.get("index"), int) and isinstance(record.get("hash"), str):
        anchors.append(Anchor(int(record["index"]), str(record["hash"]), f"{source} (head seen at deploy)"))
    if record.get("checkpoint") is not None:
        anchors.append(verified_checkpoint(record["checkpoint"], governance, f"{source} (checkpoint)"))
    return anchors


def witness(trust_file: Path, audit: AuditLog, governance: GovernanceConfig, source: str) -> None:
    """At a site: check the log against what this site saw before, then record its newest head.

    Keeps the newest valid checkpoint the site has seen, so deleting the coordinator's checkpoint
    file loses nothing.
    """
    entries = audit.entries()
    check_anchors(entries, witnessed(trust_file, governance, source), audit.path)
    if not entries:
        return
    record = read_trust(trust_file)
    previous = record.get("audit") if isinstance(record.get("audit"), Mapping) else {}
    assert isinstance(previous, Mapping)
    checkpoint = previous.get("checkpoint")
    path = checkpoint_path(audit)
    if path.is_file():
        candidate = json.loads(path.read_text(encoding="utf-8"))
        anchor = verified_checkpoint(candidate, governance, str(path))
        check_anchors(entries, [anchor], audit.path)
        old = None if checkpoint is None else verified_checkpoint(checkpoint, governance, source)
        if old is None or anchor.index >= old.index:
            checkpoint = candidate
    head = entries[-1]
    write_trust(trust_file, {**record, "audit": {"index": head.index, "hash": head.hash, "checkpoint": checkpoint}})


def verify_anchored(
    audit: AuditLog, governance: GovernanceConfig, witnesses: Mapping[str, Path]
) -> tuple[int, list[Anchor], list[str]]:
    """The whole check behind ``quorum audit verify``: chain, newest checkpoint, every reachable witness.

    Returns the entry count, the anchors checked and notes on what could not be checked.
    """
    entries = audit.entries() if audit.path.exists() else []
    anchors: list[Anchor] = []
    notes: list[str] = []
    checkpoint = read_checkpoint(audit, governance)
    if checkpoint is not None:
        anchors.append(checkpoint)
    elif governance.checkpoints is None:
        notes.append("governance pins no checkpoint key: no signed checkpoint to check the tail against")
    else:
        notes.append(f"no checkpoint file {checkpoint_path(audit)} (deleted, or none signed yet)")
    for site_id, trust_file in witnesses.items():
        if not Path(trust_file).is_file():
            notes.append(f"site {site_id}: no witness record here ({trust_file})")
            continue
        anchors += witnessed(trust_file, governance, f"site {site_id}")
    check_anchors(entries, anchors, audit.path)
    return len(entries), anchors, notes
