"""Approver key pairs: ECDSA P-256 in PEM, the key type OpenSSF model-signing accepts.

A private key is a credential, so it is born with mode 0600 (never widened and narrowed
later, which would leave a window where others can read it). Neither file of a pair is ever
overwritten: losing an approver's only key to a mistyped path cannot be undone, and a public key
replaced beside a surviving private key would no longer match it, whereas a refused command can
simply be run again.

Governance pins every key by fingerprint (sha256 of the DER public key), so the key files
themselves may sit in a folder others can write: ``trusted_public_key`` believes a file only
when it matches its pin.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quorum.configs.errors import ConfigError, NotPermitted, QuorumNotMet
from quorum.configs.schema import Approver, GovernanceConfig, read_input

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


def generate_key_pair(private_path: Path, public_path: Path) -> None:
    """Create a new approver key pair; fail rather than replace an existing private key.

    Both files are written to temporary names first, so a crash never leaves a truncated key
    behind that would then block a retry. The private key is committed with a hard link,
    which fails atomically if another process created the file in the meantime.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise ConfigError(
            f"private and public key paths are the same file: {private_path}",
            fix="pass different paths, e.g. alice.pem and alice.pub",
        )
    _refuse_existing(private_path)
    _refuse_existing(public_path)
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_tmp = _write_temp(private_path, private_pem, _PRIVATE_MODE)
    try:
        public_tmp = _write_temp(public_path, public_pem, _PUBLIC_MODE)
        try:
            _link_new(public_tmp, public_path)
            try:
                _link_new(private_tmp, private_path)
            except BaseException:
                public_path.unlink(missing_ok=True)  # ours: it was linked just above
                raise
        finally:
            public_tmp.unlink(missing_ok=True)
    finally:
        private_tmp.unlink(missing_ok=True)
    _fsync_dir(private_path.parent)
    _fsync_dir(public_path.parent)


def load_public_key(public_path: Path) -> ec.EllipticCurvePublicKey:
    """An approver's EC public key from PEM; every way the file can be unusable is a ``ConfigError``."""
    public_path = Path(public_path)
    data = read_input(public_path, "public key", "check the path or run `quorum keys generate` first")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{public_path} is not a PEM public key: {exc}", fix="pass the .pub file, not the private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{public_path} is not an EC public key", fix="use a key from `quorum keys generate`")
    return key


def load_private_key(private_path: Path) -> ec.EllipticCurvePrivateKey:
    private_path = Path(private_path)
    data = read_input(private_path, "private key", "pass the path of your .key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{private_path} is not an unencrypted PEM private key: {exc}", fix="pass your private key file"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{private_path} is not an EC private key", fix="use a key from `quorum keys generate`")
    return key


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def public_key_fingerprint(public_path: Path) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: stable whatever the PEM line wrapping.

    Note model_signing's own key "hint" in a bundle is the sha256 of the *PEM* encoding, so
    the two values differ; this one is what governance pins and Quorum records in lineage.
    """
    return key_fingerprint(load_public_key(public_path))


def private_key_fingerprint(private_path: Path) -> str:
    """The fingerprint of a private key's public half, to tell which approver holds it."""
    return key_fingerprint(load_private_key(private_path).public_key())


def pinned_key_problem(public_path: Path, fingerprint: str, owner: str) -> str | None:
    """Why the key file at ``public_path`` may not speak for ``owner``, or None when it matches the pin."""
    try:
        actual = public_key_fingerprint(public_path)
    except ConfigError as error:
        return f"{owner}'s public key cannot be used: {error.message}"
    if actual != fingerprint:
        return (
            f"{owner}'s public key file {public_path} has fingerprint {actual[:16]}..., not the "
            f"{fingerprint[:16]}... pinned in governance (key file replaced)"
        )
    return None


def trusted_public_key(public_path: Path, fingerprint: str, owner: str) -> ec.EllipticCurvePublicKey:
    """The key at ``public_path``, only if it is the one governance pins for ``owner``."""
    problem = pinned_key_problem(public_path, fingerprint, owner)
    if problem:
        raise NotPermitted(problem, fix="restore the key file from governance's owner, or fix the pin in git")
    return load_public_key(public_path)


def approver_for_private_key(private_path: Path, governance: GovernanceConfig) -> str:
    """The governance approver whose pinned fingerprint matches ``private_path``; signing needs a known identity."""
    fingerprint = private_key_fingerprint(private_path)
    for approver in governance.approvers:
        if approver.fingerprint == fingerprint:
            return approver.name
    raise ConfigError(
        f"the key {private_path} belongs to no approver in governance (fingerprint {fingerprint})",
        fix="add this fingerprint to configs/governance.yaml (signed by the current quorum) or use an approver's key",
    )


def require_rollback_right(governance: GovernanceConfig, approver: str, today: date) -> None:
    """Raise unless ``approver`` may roll back: listed under ``rollback`` and holding a usable key."""
    if approver not in governance.rollback_approvers:
        allowed = ", ".join(governance.rollback_approvers) or "nobody"
        raise NotPermitted(
            f"approver {approver} may not roll back the champion (allowed: {allowed})",
            fix="ask an approver listed under `rollback` in governance.yaml",
        )
    problem = governance.approver(approver).key_problem(today)
    if problem:
        raise NotPermitted(f"{problem}; it cannot authorise a rollback", fix="use a current, unrevoked key")


def rollback_signers(governance: GovernanceConfig, keys: Sequence[Path], today: date) -> tuple[tuple[str, Path], ...]:
    """Who signs a rollback with which key: the initiator (the first key allowed to roll back) first.

    Raises unless every key is a current approver's, the approvers are distinct, one of them may roll
    back, and together they reach the governance quorum: a rollback statement needs the quorum, like
    a promotion.
    """
    signers: dict[str, Path] = {}
    for key in keys:
        approver = approver_for_private_key(key, governance)
        if approver in signers:
            raise ConfigError(
                f"--key {key} is approver {approver}'s key again; one approver signs once",
                fix="pass one --key per approver",
            )
        problem = governance.approver(approver).key_problem(today)
        if problem:
            raise NotPermitted(f"{problem}; it cannot sign a rollback", fix="use a current, unrevoked key")
        signers[approver] = key
    allowed = [name for name in signers if name in governance.rollback_approvers]
    if signers and not allowed:
        require_rollback_right(governance, next(iter(signers)), today)  # refuses, naming who may
    if len(signers) < governance.quorum:
        raise QuorumNotMet(
            f"a rollback needs the signatures of {governance.quorum} approvers (the governance quorum); "
            f"{len(signers)} key(s) given ({', '.join(signers)})",
            fix="pass one --key per approver, e.g. `quorum rollback MODEL --key ann.key --key ben.key`; "
            "nothing was changed",
        )
    initiator = allowed[0]
    return ((initiator, signers[initiator]), *((n, k) for n, k in signers.items() if n != initiator))


def approver_key_problem(approver: Approver) -> str | None:
    """``pinned_key_problem`` for a governance approver."""
    return pinned_key_problem(approver.public_key, approver.fingerprint, f"approver {approver.name}")


def _refuse_existing(path: Path) -> None:
    if path.exists() or path.is_symlink():
        kind = "public" if path.suffix == ".pub" else "private"
        raise ConfigError(
            f"{kind} key {path} already exists; refusing to overwrite it",
            fix="move the old key away first if you really mean to replace it, or choose another path",
        )


def _write_temp(final: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` next to ``final`` (same filesystem, so the later link/rename is atomic).

    The file gets its final mode from ``os.open`` itself, so there is never a moment when a
    private key sits on disk with wider permissions.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _link_new(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        _refuse_existing(target)
        raise


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entries durable, not just the file contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
