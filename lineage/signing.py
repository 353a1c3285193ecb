"""Approver signatures over a model directory, and the M-of-N quorum promotion needs.

Signing is delegated to OpenSSF model-signing (key mode), so anyone can check an approval
without Quorum: ``model_signing verify key --signature alice.sig --public_key alice.pub MODEL``.
We keep model-signing's default hashing (sha256 per file, git metadata ignored) precisely so
that its CLI, run with default flags, agrees with us about what was signed.

Signatures live outside the model directory: a signature inside it would change the very
files it signs. A signature file's name claims an approver (``alice.sig``, ``alice.2.sig``),
and the claim is only believed if the signature verifies against that approver's key.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from quorum.configs.errors import ConfigError, QuorumNotMet, SignatureError
from quorum.configs.schema import Approver, GovernanceConfig

SIGNATURE_SUFFIX = ".sig"
_CHANGED = "model differs from what was signed"
# What model-signing leaves out by default; anything else left out weakens the signature.
_DEFAULT_IGNORED = frozenset({".git", ".gitattributes", ".github", ".gitignore"})


@dataclass(frozen=True)
class Signature:
    """One approval; ``digest`` pins the exact signature bytes in lineage tags for later audit."""

    approver: str
    path: Path
    digest: str


@dataclass(frozen=True)
class QuorumResult:
    """The outcome of a quorum check, with a reason per rejected file so users can act on it."""

    valid_approvers: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]
    required: int

    @property
    def met(self) -> bool:
        return len(self.valid_approvers) >= self.required


def sign_model(model_dir: Path, private_key: Path, signature_path: Path, approver: str) -> Signature:
    """Sign every file of ``model_dir``; the signature is written atomically.

    Atomic because quorum checks scan the signatures folder: a half-written ``.sig`` seen by a
    concurrent check would be reported as a bad approval rather than a pending one.
    """
    from cryptography.exceptions import UnsupportedAlgorithm

    model_dir, private_key, signature_path = Path(model_dir), Path(private_key), Path(signature_path)
    _require_model_dir(model_dir)
    _require_outside(model_dir, signature_path)
    from quorum.lineage.keys import load_private_key

    load_private_key(private_key)  # a missing, unreadable or malformed key is named before anything is written
    signature_path.parent.mkdir(parents=True, exist_ok=True)
    temp = signature_path.with_name(f".{signature_path.name}.{secrets.token_hex(8)}.tmp")
    try:
        _sign_to(model_dir, private_key, temp)
        os.replace(temp, signature_path)
    except (ValueError, TypeError, AttributeError, UnsupportedAlgorithm, OSError) as exc:
        raise SignatureError(
            f"{approver} could not sign {model_dir}: {exc}",
            fix="check the private key is an unencrypted EC PEM key and the model has no symlinks",
        ) from exc
    finally:
        temp.unlink(missing_ok=True)
    return Signature(approver=approver, path=signature_path, digest=_file_digest(signature_path))


def verify_signature(model_dir: Path, signature_path: Path, public_key: Path) -> None:
    """Raise unless ``signature_path`` is a signature by ``public_key`` over exactly ``model_dir``."""
    model_dir, signature_path, public_key = Path(model_dir), Path(signature_path), Path(public_key)
    reason = _verification_problem(model_dir, signature_path, public_key)
    if reason:
        raise SignatureError(
            f"signature {signature_path} (approver {_claimed_approver(signature_path)}) rejected for "
            f"{model_dir}: {reason}",
            fix="re-approve the model if it was changed on purpose; otherwise treat the model as tampered",
        )


def check_quorum(
    model_dir: Path, signatures_dir: Path, governance: GovernanceConfig, now: date | None = None
) -> QuorumResult:
    """Count distinct approvers with a valid signature; explain every signature that is not.

    An approval counts once per approver and once per key, so neither a second file from the
    same person nor two governance entries sharing one key can inflate the count. A revoked or
    expired key (as of ``now``, by default today in UTC) approves nothing.
    """
    model_dir, signatures_dir = Path(model_dir), Path(signatures_dir)
    today = now or today_utc()
    _require_model_dir(model_dir)
    _require_outside(model_dir, signatures_dir)
    valid: list[str] = []
    counted_keys: dict[str, str] = {}
    rejected: list[tuple[str, str]] = []
    for signature_path in _signature_files(signatures_dir):
        reason = _quorum_problem(model_dir, signature_path, governance, today)
        name = _claimed_approver(signature_path)
        if reason is None and name in valid:
            reason = f"approver {name} is already counted; one approver approves once"
        elif reason is None:
            reason = _shared_key_problem(governance.approver(name), counted_keys)
            if reason is None:
                valid.append(name)
        if reason:
            rejected.append((signature_path.name, reason))
    return QuorumResult(valid_approvers=tuple(valid), rejected=tuple(rejected), required=governance.quorum)


def require_quorum(
    model_dir: Path, signatures_dir: Path, governance: GovernanceConfig, now: date | None = None
) -> QuorumResult:
    """Like ``check_quorum`` but a promotion gate: raise ``QuorumNotMet`` explaining the shortfall."""
    today = now or today_utc()
    result = check_quorum(model_dir, signatures_dir, governance, today)
    if result.met:
        return result
    valid = ", ".join(result.valid_approvers) or "none"
    count = len(result.valid_approvers)
    message = f"{result.required} of {len(governance.approvers)} approvals needed, {count} valid: {valid}"
    if result.rejected:
        message += "; rejected: " + ", ".join(f"{name} ({reason})" for name, reason in result.rejected)
    missing = [
        a.name for a in governance.approvers if a.name not in result.valid_approvers and a.key_problem(today) is None
    ]
    fix = f"run `quorum approve` as one of: {', '.join(missing)} (signatures go in {signatures_dir})"
    if any(reason.startswith(_CHANGED) for _, reason in result.rejected):
        fix = (
            f"the files in {model_dir} changed after they were signed: treat this version as tampered and restore "
            f"it from a trusted copy or re-run the lifecycle; only if the change was intended, {fix}"
        )
    raise QuorumNotMet(message, fix=fix)


def _sign_to(model_dir: Path, private_key: Path, signature_path: Path) -> None:
    from model_signing import signing  # lazy: a heavy import that only signing and verifying need

    config = signing.Config()  # type: ignore[no-untyped-call]
    config.use_elliptic_key_signer(private_key=private_key).set_hashing_config(_hashing_config())
    config.sign(model_dir, signature_path)


def _hashing_config() -> Any:
    """model-signing's defaults, pinned so a new library default cannot change what approvals cover.

    sha256 per file, with git metadata (.git, .gitignore, ...) left out, exactly as its CLI
    does by default, so ``model_signing verify key`` needs no extra flags.
    """
    from model_signing import hashing

    config = hashing.Config()  # type: ignore[no-untyped-call]
    return config.use_file_serialization(hashing_algorithm="sha256")


def _verification_problem(model_dir: Path, signature_path: Path, public_key: Path) -> str | None:
    """Why the signature does not hold, or None; every failure is a reason, never a crash."""
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from model_signing import verifying

    if not model_dir.is_dir():
        return f"model directory {model_dir} does not exist"
    if not signature_path.is_file():
        return f"signature {signature_path} is not an existing file"
    if not public_key.is_file():
        return f"public key {public_key} does not exist"
    malformed = _bundle_problem(signature_path)
    if malformed:
        return malformed
    try:
        config = verifying.Config()  # type: ignore[no-untyped-call]
        config.use_elliptic_key_verifier(public_key=public_key).set_hashing_config(_hashing_config())
        config.verify(model_dir, signature_path)
        return _ignored_paths_problem(signature_path)
    except InvalidSignature:
        return "the signature was not made by this public key (or the signature file was altered)"
    except (ValueError, KeyError, TypeError, AttributeError, UnsupportedAlgorithm, OSError) as exc:
        return _summarize(exc)


def _bundle_problem(signature_path: Path) -> str | None:
    """Name the common ways a file is not a signature at all, before model-signing's raw errors."""
    try:
        bundle = json.loads(signature_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        return f"not a signature bundle: not readable JSON ({exc})"
    if not isinstance(bundle, dict) or not isinstance(bundle.get("dsseEnvelope"), dict):
        return "not a model-signing signature bundle (no dsseEnvelope)"
    return None


def _ignored_paths_problem(signature_path: Path) -> str | None:
    """Reject signatures that leave model files out (e.g. signed with ``--ignore-paths``).

    model-signing honours the ignore list recorded in the signature, so such a signature would
    keep verifying while the files it skipped are swapped. Called only after the signature
    verified, so the payload read here is authentic.
    """
    ignored = set(_signed_serialization(signature_path).get("ignore_paths", [])) - _DEFAULT_IGNORED
    if ignored:
        return f"the signature leaves files out of the model: {', '.join(sorted(map(str, ignored)))}"
    return None


def _signed_serialization(signature_path: Path) -> dict[str, Any]:
    bundle = json.loads(signature_path.read_text(encoding="utf-8"))
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    serialization: dict[str, Any] = statement["predicate"]["serialization"]
    return serialization


def _summarize(exc: BaseException) -> str:
    """One line per reason; model-signing's mismatch message embeds raw digest bytes, keep file names."""
    if isinstance(exc, KeyError):
        return f"malformed signature bundle: missing field {exc}"
    text = (str(exc) or type(exc).__name__).splitlines()[0]
    prefix = "Signature mismatch: "
    if not text.startswith(prefix):
        return text
    try:
        diffs = ast.literal_eval(text[len(prefix) :])
    except (ValueError, SyntaxError):
        return text
    if not isinstance(diffs, list):
        return text
    return f"{_CHANGED}: " + "; ".join(str(d).split(": Expected", 1)[0] for d in diffs)


def today_utc() -> date:
    """The date key expiry is judged against when no ``now`` is given."""
    return datetime.now(UTC).date()


def _quorum_problem(model_dir: Path, signature_path: Path, governance: GovernanceConfig, today: date) -> str | None:
    name = _claimed_approver(signature_path)
    if name not in {a.name for a in governance.approvers}:
        return "not an approver in governance"
    from quorum.lineage.keys import approver_key_problem

    approver = governance.approver(name)
    return (
        approver.key_problem(today)
        or approver_key_problem(approver)
        or _verification_problem(model_dir, signature_path, approver.public_key)
    )


def _shared_key_problem(approver: Approver, counted_keys: dict[str, str]) -> str | None:
    """Record the approver's pinned key; reject if another counted approver already used the same key."""
    other = counted_keys.setdefault(approver.fingerprint, approver.name)
    if other != approver.name:
        return f"same public key as approver {other}; one key cannot approve twice"
    return None


def _signature_files(signatures_dir: Path) -> Iterator[Path]:
    if not signatures_dir.is_dir():
        return iter(())
    return iter(sorted(p for p in signatures_dir.iterdir() if p.name.endswith(SIGNATURE_SUFFIX)))


def _claimed_approver(signature_path: Path) -> str:
    return signature_path.name.split(".", 1)[0]


def _require_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist", fix="pass the folder holding the model files")


def _require_outside(model_dir: Path, path: Path) -> None:
    if path.resolve().is_relative_to(model_dir.resolve()):
        raise ConfigError(
            f"{path} is inside the model directory {model_dir}; a signature there would change the signed files",
            fix="keep signatures in a separate folder next to the model",
        )


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
