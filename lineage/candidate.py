"""The candidate pointer: which version a site's service tries as its candidate (shadow or canary traffic).

Promotion moves MLflow's ``candidate`` alias, for people browsing MLflow, and once the version's files,
provenance and that run's signatures are in the artifact store it writes ``models/<model>/candidate.json``
beside them. A site's service reads this pointer, never MLflow, so the site process needs no MLflow.

The pointer is unsigned and lives where an attacker may write: it only *selects* a version. What the
selected version must then pass is decided in ``quorum.lineage.serving_trust`` (provenance, at least
one approver signature, and a version newer than the champion), so a rewritten pointer can switch the
candidate off or name another signed version newer than the champion, never an unsigned one or an
old one. Its version must be a plain registry number: it becomes part of paths at the site.
"""

from __future__ import annotations

import re

from quorum.configs.errors import SignatureError
from quorum.lineage.artifacts import ArtifactMissing, ArtifactStore

_VERSION = re.compile(r"[1-9][0-9]{0,17}")
_FIX = "promote the candidate again (its promotion rewrites the pointer); the service serves no candidate until then"


class CandidatePointerError(SignatureError):
    """The pointer is not one promotion wrote: unreadable, about another model, or a version that is no number."""

    headline = "Candidate pointer is malformed"


def candidate_key(model: str) -> str:
    return f"models/{model}/candidate.json"


def publish_candidate(store: ArtifactStore, model: str, version: str) -> None:
    """Name ``version`` as the candidate (the store writes atomically: a reader never sees half a pointer)."""
    if not _VERSION.fullmatch(version):
        raise ValueError(f"a registry version is a positive number, not {version!r}")
    store.put_json(candidate_key(model), {"model": model, "version": version})


def read_candidate(store: ArtifactStore, model: str) -> str | None:
    """The version the pointer names, ``None`` when no candidate was ever named; raise if it is malformed."""
    key = candidate_key(model)
    if not store.exists(key):
        return None
    try:
        data = store.get_json(key)
    except ArtifactMissing:  # removed since ``exists``: no candidate, as if never named
        return None
    except ValueError:  # not JSON
        raise CandidatePointerError(f"{key} is not JSON", fix=_FIX) from None
    version = data.get("version") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("model") != model:
        raise CandidatePointerError(f"{key} does not name model {model}", fix=_FIX)
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise CandidatePointerError(f"{key} names no registry version (a positive number)", fix=_FIX)
    return version


def version_number(version: str) -> int:
    """A registry version as the number that orders it (``"10"`` is newer than ``"9"``)."""
    if not _VERSION.fullmatch(version):
        raise CandidatePointerError(f"version {version!r} is not a registry version (a positive number)", fix=_FIX)
    return int(version)
