"""Removing personal data before anything else at a site touches the table.

Two ways, chosen per site (``pii_mode``): drop the listed columns, or replace each value by an
HMAC-SHA256 under a secret salt that never leaves the site. Hashing keeps equal values equal, so a
site can still join or de-duplicate on a pseudonymised id, while nobody without the salt can test a
guessed value against the hash (a plain, unsalted SHA-256 of an email or phone number is reversed by
hashing every candidate).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from quorum.configs.errors import SiteDataError

if TYPE_CHECKING:
    import pandas as pd

    from quorum.configs.schema import SiteConfig

SALT_FILE = ".salt"
SALT_BYTES = 32
_GROUP_OR_OTHER = stat.S_IRWXG | stat.S_IRWXO


def protect_pii(raw: pd.DataFrame, site: SiteConfig) -> pd.DataFrame:
    """The site's PII columns dropped or hashed, as its config says; the input is left untouched."""
    if site.pii_mode == "hash":
        return hash_pii(raw, site, site_salt(site.root))
    return drop_pii(raw, site)


def drop_pii(raw: pd.DataFrame, site: SiteConfig) -> pd.DataFrame:
    """Drop the configured PII columns: nothing downstream may ever see them.

    The record id stays for the contract's uniqueness check; ``features.clean`` drops it next.
    """
    doomed = [c for c in site.pii_columns if c in raw.columns]
    return raw.drop(columns=doomed)


def hash_pii(raw: pd.DataFrame, site: SiteConfig, salt: bytes) -> pd.DataFrame:
    """Replace every value of each PII column by its hex HMAC-SHA256 under ``salt``; nulls stay null.

    Values are hashed as their text (``str``), so ``42`` read from a CSV and ``"42"`` from Parquet
    pseudonymise alike. Each distinct value is hashed once (ids and emails repeat), from a copy of
    an HMAC already keyed with the salt. Hashed columns are never features: the config refuses PII
    feature columns and ``features.clean`` keeps only the shared schema.
    """
    import pandas as pd

    keyed = hmac.new(salt, digestmod=hashlib.sha256)
    frame = raw.copy()
    for column in (c for c in site.pii_columns if c in frame.columns):
        present = frame[column].notna().to_numpy()
        codes, distinct = pd.factorize(frame[column][present].astype(str))
        digests = np.array([_keyed_digest(keyed, str(value)) for value in distinct], dtype=object)
        hashed = np.full(len(frame), None, dtype=object)
        hashed[present] = digests[codes]
        frame[column] = hashed
    return frame


def pseudonym(value: str, salt: bytes) -> str:
    """One value's pseudonym under ``salt`` (what ``hash_pii`` writes for it)."""
    return _keyed_digest(hmac.new(salt, digestmod=hashlib.sha256), value)


def _keyed_digest(keyed: hmac.HMAC, value: str) -> str:
    digest = keyed.copy()
    digest.update(value.encode("utf-8"))
    return digest.hexdigest()


def site_salt(root: Path) -> bytes:
    """The site's secret salt at ``root/.salt``, created on first use (mode 0600, never overwritten).

    Losing it changes every pseudonym (joins against earlier hashed data stop matching); copying
    it off the site lets its holder test guesses, so it is refused when others may read it.
    """
    path = root / SALT_FILE
    if not path.exists():
        _create_salt(path)
    mode = path.stat().st_mode
    if mode & _GROUP_OR_OTHER:
        raise SiteDataError(
            f"the PII salt {path} may be read by other users (mode {stat.S_IMODE(mode):04o})",
            fix=f"chmod 600 {path}",
        )
    salt = path.read_bytes()
    if len(salt) < SALT_BYTES:
        raise SiteDataError(
            f"the PII salt {path} holds {len(salt)} bytes, at least {SALT_BYTES} are needed",
            fix="restore the site's salt from its backup (a new salt changes every pseudonym)",
        )
    return salt


def _create_salt(path: Path) -> None:
    """Write a new random salt, then link it into place: a reader never sees a half-written salt, and
    when two processes create one at once, the first link wins and both use that salt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{SALT_FILE}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(os.urandom(SALT_BYTES))
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temp_name, path)
    finally:
        os.unlink(temp_name)
