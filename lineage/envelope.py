"""Signed JSON statements: a payload, its canonical bytes, and signatures by keys governance pins.

The champion statement, the audit checkpoints and governance rotations are all small JSON payloads
that must be believed only when the right keys signed them. Each signature covers a type-tagged
pre-authentication encoding (as DSSE does): ``quorum:<type>:v1`` and the canonical JSON bytes, so a
signature over one kind of statement can never be replayed as another. A signature names its signer
and key id (the key's pinned fingerprint); it counts only if the signer is in governance, the key id
is the pinned one, the key file matches that pin, the key is neither revoked nor expired, and the
ECDSA signature holds.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from quorum.configs.errors import ConfigError
from quorum.configs.schema import GovernanceConfig


@dataclass(frozen=True)
class Signed:
    """One signature over a payload: who claims to have signed, with which pinned key, and the bytes."""

    signer: str
    keyid: str
    sig: str

    def to_dict(self) -> dict[str, str]:
        return {"signer": self.signer, "keyid": self.keyid, "sig": self.sig}

    @classmethod
    def from_dict(cls, data: object) -> Signed:
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("signer", "keyid", "sig")):
            raise ValueError("a signature needs string fields signer, keyid and sig")
        return cls(str(data["signer"]), str(data["keyid"]), str(data["sig"]))


@dataclass(frozen=True)
class Tally:
    """Which signers' signatures held, and why each other one did not."""

    valid: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        valid = ", ".join(self.valid) or "none"
        text = f"valid signatures: {valid}"
        if self.rejected:
            text += "; rejected: " + ", ".join(f"{name} ({why})" for name, why in self.rejected)
        return text


def canonical(payload: Mapping[str, Any]) -> bytes:
    """One byte-exact form per payload, so signatures and digests can be recomputed by anyone."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(payload)).hexdigest()


def pae(kind: str, payload: Mapping[str, Any]) -> bytes:
    """What is actually signed: the statement type, then the canonical payload."""
    return f"quorum:{kind}:v1\n".encode() + canonical(payload)


def sign(kind: str, payload: Mapping[str, Any], private_key: Path, signer: str) -> Signed:
    from quorum.lineage.keys import key_fingerprint, load_private_key

    key = load_private_key(private_key)
    raw = key.sign(pae(kind, payload), ec.ECDSA(hashes.SHA256()))
    return Signed(signer, key_fingerprint(key.public_key()), base64.b64encode(raw).decode("ascii"))


def check_with_key(
    kind: str, payload: Mapping[str, Any], signature: Signed, public_key: Path, pinned: str
) -> str | None:
    """Why ``signature`` is not by the key pinned as ``pinned`` over ``payload``, or None when it is."""
    from quorum.lineage.keys import load_public_key, pinned_key_problem

    if signature.keyid != pinned:
        return "signed with a key that is not the one governance pins"
    problem = pinned_key_problem(public_key, pinned, signature.signer)
    if problem:
        return problem
    try:
        load_public_key(public_key).verify(
            base64.b64decode(signature.sig), pae(kind, payload), ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, ValueError, ConfigError):
        return "the signature does not verify (forged, or the statement was altered)"
    return None


def tally(
    kind: str,
    payload: Mapping[str, Any],
    signatures: Iterable[Signed],
    governance: GovernanceConfig,
    today: date,
    allowed: Sequence[str] | None = None,
) -> Tally:
    """Count distinct approvers (among ``allowed``, default all) whose signature over ``payload`` holds."""
    names = {a.name for a in governance.approvers}
    valid: list[str] = []
    rejected: list[tuple[str, str]] = []
    for signature in signatures:
        name = signature.signer
        if name not in names:
            rejected.append((name, "not an approver in governance"))
            continue
        if allowed is not None and name not in allowed:
            rejected.append((name, "not allowed to sign this statement by governance"))
            continue
        approver = governance.approver(name)
        problem = approver.key_problem(today) or check_with_key(
            kind, payload, signature, approver.public_key, approver.fingerprint
        )
        if problem is None and name in valid:
            problem = "already counted; one approver signs once"
        if problem:
            rejected.append((name, problem))
        else:
            valid.append(name)
    return Tally(tuple(valid), tuple(rejected))


def parse_envelope(data: object) -> tuple[dict[str, Any], tuple[Signed, ...]]:
    """``{"payload": {...}, "signatures": [...]}`` into its parts; raises ``ValueError`` on any other shape."""
    if not isinstance(data, dict) or not isinstance(data.get("payload"), dict):
        raise ValueError("expected {payload: {...}, signatures: [...]}")
    signatures = data.get("signatures", [])
    if not isinstance(signatures, list):
        raise ValueError("signatures must be a list")
    return dict(data["payload"]), tuple(Signed.from_dict(s) for s in signatures)


def envelope(payload: Mapping[str, Any], signatures: Iterable[Signed]) -> dict[str, Any]:
    return {"payload": dict(payload), "signatures": [s.to_dict() for s in signatures]}
