"""Governance rotation: a new governance file counts only with the current quorum's signatures.

As TUF rotates its root metadata, governance version N+1 is trusted only when a quorum of version N's
approvers signed it (``quorum governance sign NEW --key K`` on each approver's machine, then
``quorum governance adopt NEW``). Adopting keeps every version ever trusted, with its signatures, in
``<name>.history/`` beside the governance file, so any verifier can replay the chain:

    governance.history/v1.yaml                   the first version: the root
    governance.history/v2.yaml, v2.sigs.json     version 2 and version 1's quorum signing it
    ...

The root is never taken on first use: the federation config (in git) pins version 1's sha256 as
``governance_root``, and a site walks the chain from that file only, as TUF ships its first root with
the client. A governance chain someone wrote elsewhere (in the state folder, say), however well its
own keys signed it, starts at another root and is refused, on the first deploy as on every later one.
A site also remembers the newest version it accepted (version and sha256, in its own folder) and
accepts a different file only by walking the chain forward from there: an older file (a governance
rollback, e.g. to bring back a revoked approver) or a file nobody signed is refused.

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
    governance_path: Path, since: tuple[int, str] | None = None, today: date | None = None, root: str | None = None
) -> GovernanceConfig:
    """The governance file, if its history chains to it from ``since`` (version, sha256) or from version 1.

    Each step must carry a quorum of the previous version's approvers; an older version than ``since``
    or a different file with the same version is refused. With ``root`` (the pinned sha256 of version
    1), a chain whose version 1 is another file is refused.
    """
    if root is not None:
        _require_root(governance_path, root)
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


def trusted_governance(governance_path: Path, trust_file: Path, root: str | None) -> GovernanceConfig:
    """What a site calls before using governance: verify the chain from the pinned root and from what it
    accepted before, then record it. ``root`` is the federation config's ``governance_root``."""
    if root is None:
        raise ConfigError(
            "the federation config pins no governance root, so a site cannot tell the governance in git from "
            "one written anywhere else",
            fix=f"add `governance_root: SHA256` to the federation config (in git): the sha256 of governance "
            f"version 1, printed by `quorum governance verify --governance {governance_path}` from your checkout",
        )
    record = read_trust(trust_file)
    seen = record.get("governance")
    if isinstance(seen, dict) and seen.get("root", root) != root:
        raise SignatureError(
            f"this site accepted governance rooted at sha256 {str(seen['root'])[:16]}..., but the federation config "
            f"pins governance_root {root[:16]}...",
            fix="a new governance root takes a deliberate reset at each site: check the config in git with its "
            "approvers, then remove the `governance` entry of the site's deployed/trust.json",
        )
    since = (int(seen["version"]), str(seen["sha256"])) if isinstance(seen, dict) else None
    governance = verify_chain(governance_path, root=root)
    if since is not None:
        verify_chain(governance_path, since)
    digest = hashlib.sha256(read_input(governance_path, "governance file", _FIX)).hexdigest()
    accepted = {"version": governance.version, "sha256": digest, "root": root}
    write_trust(trust_file, {**record, "governance": accepted})
    return governance


def root_digest(governance_path: Path) -> str:
    """The sha256 of version 1 of this governance chain: what ``governance_root`` pins."""
    return hashlib.sha256(_version_one(governance_path)).hexdigest()


def _version_one(governance_path: Path) -> bytes:
    """Version 1's bytes: the file itself while it is version 1, else its copy in the history."""
    current_bytes, current = _load(governance_path)
    if current.version == 1:
        return current_bytes
    return read_input(history_dir(governance_path) / "v1.yaml", "governance history file", _FIX)


def _require_root(governance_path: Path, root: str) -> None:
    found = hashlib.sha256(_version_one(governance_path)).hexdigest()
    if found != root:
        raise SignatureError(
            f"the governance chain of {governance_path} starts at a version 1 with sha256 {found[:16]}..., but the "
            f"federation config pins governance_root {root[:16]}...: it is not the governance this federation "
            "was founded on",
            fix="deploy with the governance file from git (`--governance configs/governance.yaml`); a chain written "
            "elsewhere is never trusted",
        )


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
