"""Governance rotation: a new governance file counts only with the current quorum's signatures.

As TUF rotates its root metadata, governance version N+1 is trusted only when a quorum of version N's
approvers signed it (``quorum governance sign NEW --key K`` on each approver's machine, then
``quorum governance adopt NEW``). Adopting keeps every version ever trusted, with its signatures, in
``<name>.history/`` beside the governance file, so any verifier can replay the chain:

    governance.history/v1.yaml                   the first version (trusted on first use, from git)
    governance.history/v2.yaml, v2.sigs.json     version 2 and version 1's quorum signing it
    ...

A site remembers the newest version it accepted (version and sha256, in its own folder) and accepts a
different file only by walking the chain forward from there: an older file (a governance rollback,
e.g. to bring back a revoked approver) or a file nobody signed is refused.

What a signature covers: ``{version, sha256 of the new file's bytes, sha256 of the previous file}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from quorum.configs.errors import ConfigError, NotPermitted, SignatureError
from quorum.configs.schema import GovernanceConfig, parse_governance, read_input
from quorum.lineage.champion import read_trust, write_trust
from quorum.lineage.envelope import Signed, tally

KIND = "governance"
_FIX = "use the governance file your approvers signed (see `quorum governance verify`), restored from git"


def history_dir(governance_path: Path) -> Path:
    return governance_path.with_name(governance_path.stem + ".history")


def sidecar(new_path: Path) -> Path:
    """Where signatures over a proposed governance file collect before it is adopted."""
    return new_path.with_name(new_path.name + ".sigs.json")


def rotation_payload(previous: bytes, new: bytes, version: int) -> dict[str, Any]:
    return {
        "type": KIND,
        "version": version,
        "sha256": hashlib.sha256(new).hexdigest(),
        "previous_sha256": hashlib.sha256(previous).hexdigest(),
    }


def sign_rotation(governance_path: Path, new_path: Path, private_key: Path) -> tuple[str, int]:
    """Add the key holder's signature to ``new_path``'s sidecar; return (approver, signatures now held)."""
    from quorum.lineage.envelope import sign
    from quorum.lineage.keys import approver_for_private_key

    current_bytes, current = _load(governance_path)
    new_bytes, new = _load(new_path, anchor=governance_path)
    _require_next(current, new, new_path)
    approver = approver_for_private_key(private_key, current)
    problem = current.approver(approver).key_problem(datetime.now(UTC).date())
    if problem:
        raise NotPermitted(f"{problem}; it cannot sign a governance change", fix="sign with a current, unrevoked key")
    payload = rotation_payload(current_bytes, new_bytes, new.version)
    held = [s for s in _signatures(sidecar(new_path)) if s.signer != approver]
    held.append(sign(KIND, payload, private_key, approver))
    _write_json(sidecar(new_path), {"payload": payload, "signatures": [s.to_dict() for s in held]})
    return approver, len(held)


def adopt(governance_path: Path, new_path: Path, today: date | None = None) -> GovernanceConfig:
    """Replace the governance file with ``new_path`` once the current quorum signed it; keep the history."""
    current_bytes, current = _load(governance_path)
    new_bytes, new = _load(new_path, anchor=governance_path)
    _require_next(current, new, new_path)
    _check_step(current_bytes, current, new_bytes, new.version, _signatures(sidecar(new_path)), today, str(new_path))
    history = history_dir(governance_path)
    history.mkdir(parents=True, exist_ok=True)
    if not (history / f"v{current.version}.yaml").exists():
        (history / f"v{current.version}.yaml").write_bytes(current_bytes)
    (history / f"v{new.version}.yaml").write_bytes(new_bytes)
    (history / f"v{new.version}.sigs.json").write_bytes(sidecar(new_path).read_bytes())
    temp = governance_path.with_name(f".{governance_path.name}.tmp")
    temp.write_bytes(new_bytes)
    os.replace(temp, governance_path)
    return new


def verify_chain(
    governance_path: Path, since: tuple[int, str] | None = None, today: date | None = None
) -> GovernanceConfig:
    """The governance file, if its history chains to it from ``since`` (version, sha256) or from version 1.

    Each step must carry a quorum of the previous version's approvers; an older version than ``since``
    or a different file with the same version is refused.
    """
    current_bytes, current = _load(governance_path)
    start_version = since[0] if since else 1
    if current.version < start_version:
        raise SignatureError(
            f"{governance_path} is governance version {current.version}, older than version {start_version} "
            "already accepted here: a governance rollback",
            fix=_FIX,
        )
    versions = {current.version: current_bytes}
    history = history_dir(governance_path)
    for version in range(start_version, current.version):
        path = history / f"v{version}.yaml"
        versions[version] = read_input(path, "governance history file", _FIX)
    if (history / f"v{current.version}.yaml").is_file() and (
        (history / f"v{current.version}.yaml").read_bytes() != current_bytes
    ):
        raise SignatureError(f"{governance_path} differs from the adopted {history}/v{current.version}.yaml", fix=_FIX)
    if since is not None and hashlib.sha256(versions[start_version]).hexdigest() != since[1]:
        raise SignatureError(
            f"governance version {start_version} differs from the one accepted here earlier "
            f"(sha256 {since[1][:16]}...)",
            fix=_FIX,
        )
    for version in range(start_version + 1, current.version + 1):
        previous = parse_governance(versions[version - 1], governance_path)
        signatures = _signatures(history / f"v{version}.sigs.json")
        _check_step(
            versions[version - 1], previous, versions[version], version, signatures, today, f"version {version}"
        )
    return current


def trusted_governance(governance_path: Path, trust_file: Path) -> GovernanceConfig:
    """What a site calls before using governance: verify the chain from what it accepted, then record it."""
    record = read_trust(trust_file)
    seen = record.get("governance")
    since = (int(seen["version"]), str(seen["sha256"])) if isinstance(seen, dict) else None
    governance = verify_chain(governance_path, since)
    digest = hashlib.sha256(read_input(governance_path, "governance file", _FIX)).hexdigest()
    write_trust(trust_file, {**record, "governance": {"version": governance.version, "sha256": digest}})
    return governance


def _check_step(
    previous_bytes: bytes,
    previous: GovernanceConfig,
    new_bytes: bytes,
    version: int,
    signatures: list[Signed],
    today: date | None,
    where: str,
) -> None:
    payload = rotation_payload(previous_bytes, new_bytes, version)
    result = tally(KIND, payload, signatures, previous, today or datetime.now(UTC).date())
    if len(result.valid) < previous.quorum:
        raise SignatureError(
            f"governance {where} needs {previous.quorum} signatures of version {previous.version}'s approvers, "
            f"{len(result.valid)} valid; {result.describe()}",
            fix="each approver of the current governance runs `quorum governance sign NEW --key KEY`",
        )


def _require_next(current: GovernanceConfig, new: GovernanceConfig, new_path: Path) -> None:
    if new.version != current.version + 1:
        raise ConfigError(
            f"{new_path} is governance version {new.version}; the next version after {current.version} "
            f"must say version: {current.version + 1}",
            fix=f"set `version: {current.version + 1}` in {new_path}",
        )


def _load(path: Path, anchor: Path | None = None) -> tuple[bytes, GovernanceConfig]:
    """The exact bytes and their validated governance; key paths resolve against ``anchor``'s folder."""
    path = Path(path).resolve()
    data = read_input(path, "governance file", "pass the governance YAML file")
    return data, parse_governance(data, (anchor or path).resolve())


def _signatures(path: Path) -> list[Signed]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [Signed.from_dict(s) for s in data.get("signatures", [])]
    except (ValueError, AttributeError) as exc:
        raise SignatureError(f"{path} is not a governance signature file: {exc}", fix=_FIX) from None


def _write_json(path: Path, payload: object) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, path)
