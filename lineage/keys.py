"""Approver key pairs: ECDSA P-256 in PEM, the key type OpenSSF model-signing accepts.

A private key is a credential, so it is born with mode 0600 (never widened and narrowed
later, which would leave a window where others can read it) and is never overwritten: losing
an approver's only key to a mistyped path cannot be undone, whereas a refused command can.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from quorum.configs.errors import ConfigError
from quorum.configs.schema import GovernanceConfig

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
            _link_new(private_tmp, private_path)
            os.replace(public_tmp, public_path)
        finally:
            public_tmp.unlink(missing_ok=True)
    finally:
        private_tmp.unlink(missing_ok=True)
    _fsync_dir(private_path.parent)
    _fsync_dir(public_path.parent)


def public_key_fingerprint(public_path: Path) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: stable whatever the PEM line wrapping.

    Note model_signing's own key "hint" in a bundle is the sha256 of the *PEM* encoding, so
    the two values differ; this one is what Quorum records in lineage.
    """
    public_path = Path(public_path)
    try:
        key = serialization.load_pem_public_key(public_path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"public key {public_path} does not exist", fix="check the path or run key generation first"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{public_path} is not a PEM public key: {exc}", fix="pass the .pub file, not the private key"
        ) from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def private_key_fingerprint(private_path: Path) -> str:
    """The fingerprint of a private key's public half, to tell which approver holds it."""
    private_path = Path(private_path)
    try:
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"private key {private_path} does not exist", fix="pass the path of your .key file") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{private_path} is not an unencrypted PEM private key: {exc}", fix="pass your private key file"
        ) from None
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def approver_for_private_key(private_path: Path, governance: GovernanceConfig) -> str:
    """The governance approver whose public key matches ``private_path``; signing needs a known identity."""
    fingerprint = private_key_fingerprint(private_path)
    for approver in governance.approvers:
        if approver.public_key.is_file() and public_key_fingerprint(approver.public_key) == fingerprint:
            return approver.name
    raise ConfigError(
        f"the key {private_path} belongs to no approver in governance",
        fix="add its public key to configs/governance.yaml or use an approver's key",
    )


def _refuse_existing(private_path: Path) -> None:
    if private_path.exists() or private_path.is_symlink():
        raise ConfigError(
            f"private key {private_path} already exists; refusing to overwrite it",
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
