"""Reading a site's raw table, with a clear message for every way a file can be unusable.

A site's data arrives as CSV or Parquet from systems Quorum does not control, so each failure
names the file, what is wrong and what to do; nothing is written while reading.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from quorum.configs.errors import SiteDataError

if TYPE_CHECKING:
    import pandas as pd

SUPPORTED = (".csv", ".parquet", ".pq")


def read_table(path: Path, site_id: str) -> pd.DataFrame:
    """Read a CSV or Parquet file; refuse files that are missing, empty, malformed or changing."""
    import pandas as pd

    where = f"site {site_id}: {path}"
    if not path.exists():
        raise SiteDataError(f"{where} does not exist", fix="check the site's root and data keys in the config")
    if path.suffix.lower() not in SUPPORTED:
        raise SiteDataError(f"{where} has unsupported type {path.suffix!r}", fix="provide a .csv or .parquet file")
    before = _stamp(path)
    if before[0] == 0:
        raise SiteDataError(f"{where} is empty (0 bytes)", fix="export the site's data again")
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, encoding="utf-8", on_bad_lines="error", low_memory=False)
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError:
        raise SiteDataError(
            f"{where} is not UTF-8 text (first bad byte at offset {_first_bad_byte(path)})",
            fix="re-export the file as UTF-8",
        ) from None
    except pd.errors.EmptyDataError:
        raise SiteDataError(f"{where} has no header or rows", fix="export the site's data again") from None
    except pd.errors.ParserError as exc:
        raise SiteDataError(
            f"{where} is malformed or truncated: {str(exc).strip()}", fix="re-export the file; check its last lines"
        ) from None
    except (OSError, ValueError) as exc:
        raise SiteDataError(f"{where} cannot be read: {exc}", fix="check that it is a valid Parquet file") from None
    if _stamp(path) != before:
        raise SiteDataError(f"{where} changed while it was being read", fix="run again once the export has finished")
    if frame.empty:
        raise SiteDataError(f"{where} has a header but no rows", fix="export the site's data again")
    return frame


def require_columns(frame: pd.DataFrame, columns: Iterable[str], path: Path, site_id: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SiteDataError(
            f"site {site_id}: {path} lacks column(s) {', '.join(missing)}",
            fix="rename the columns in the file or set target/features in the config to the names the file uses",
        )


def _first_bad_byte(path: Path) -> int:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return -1


def _stamp(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
