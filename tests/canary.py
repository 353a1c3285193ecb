"""Canary values planted in every raw column of a site's data, and a scanner that looks for them in
everything written outside the sites.

A leak rarely copies a whole row. It is one value quoted in an error message, a category turned into a
metric key, a float inside a pickled object. So every canary is searched for in each encoding a store
may hold it in: UTF-8 and UTF-16 text, a number's decimal text and its little-endian float64/float32
bytes. Archives are opened (zip members: npz, torch and MLflow model files; gzip), Parquet is decoded
(its pages are compressed) and SQLite databases are also read cell by cell, because SQLite stores a
REAL big-endian and splits long text over overflow pages, where a plain byte search misses both.
"""

from __future__ import annotations

import gzip
import io
import math
import sqlite3
import struct
import zipfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from quorum.configs.schema import FederationConfig, SiteConfig

MARKER = "zorblax"  # inside every text canary: a truncated or re-cased copy of one is still found
PII = MappingProxyType(
    {"name": "Zorblax Quintavius", "email": "zorblax.canary@leak.invalid", "phone": "+1-555-0199-7731"}
)
FREE_TEXT_COLUMN = "notes"  # an export column the config never names: free text is where PII hides
ID_PREFIX = "zorblax-id-"
# Categorical features and the label may only hold values the config declares, and those names leave
# a site by design (one-hot feature names in the model and MLflow, domains in the contract summary),
# so a canary there is a value nobody declared. The contract rejects one in a training window (the site
# is left out of the job); in a current window drift only counts new categories.
UNDECLARED = MappingProxyType(
    {"region_type": "zorblax-region", "channel": "zorblax-channel", "churned": "zorblax-label"}
)
# The protected attribute declares no values: each group's name leaves the site with its evaluation
# counts. Its canary is a group too small to be judged (see PLANTED_ROWS), which must not be named.
GROUP = "zorblax-group"
# Numeric canaries are interior values with six decimals, between the 30th and 90th percentile of every
# synthetic site and away from its median. A site never shares a minimum, maximum or quantile anyway,
# but a value that is none of these cannot turn up legitimately in any summary (drift statistics,
# histogram edges, contract bounds), and a mean or sum over hundreds of rows cannot equal it: a match
# is a copied raw value. Each one's float32 bytes include a byte >= 0x80, so ASCII text (logs, JSON,
# YAML) cannot match them by chance; float64 bytes and decimal text are long enough on their own.
NUMBERS = MappingProxyType(
    {
        "age": 60.734519,
        "income": 91734.519,
        "tenure_months": 93.734519,
        "num_products": 3.734591,
        "balance": 7391.123456,
        "credit_score": 722.734519,
    }
)
PLANTED_ROWS = tuple(range(7, 7 + 15 * 23, 23))  # 15 rows: fewer than gates.min_group_size (20) by default


@dataclass(frozen=True)
class Canaries:
    """What to look for: labelled texts (matched case-insensitively) and labelled numbers."""

    texts: Mapping[str, str]
    numbers: Mapping[str, float] = field(default_factory=dict)

    def byte_needles(self) -> list[tuple[str, bytes]]:
        """Patterns searched in the raw bytes (numbers' binary forms)."""
        needles = []
        for label, value in self.numbers.items():
            needles += [(f"{label} as float64", struct.pack("<d", value)), (f"{label} as float32", _f32(value))]
        return needles

    def text_needles(self) -> list[tuple[str, bytes]]:
        """Patterns searched in the lower-cased bytes (texts and numbers' decimal text)."""
        needles = []
        for label, text in self.texts.items():
            needles += [(label, text.lower().encode()), (f"{label} as UTF-16", text.lower().encode("utf-16-le"))]
        needles += [(f"{label} as text", repr(value).encode()) for label, value in self.numbers.items()]
        return needles

    def number_label(self, value: float) -> str | None:
        """The canary a stored float is, exactly or after a round trip through float32."""
        if not math.isfinite(value):
            return None
        for label, number in self.numbers.items():
            if value == number or value == struct.unpack("<f", _f32(number))[0]:
                return label
        return None


def _f32(value: float) -> bytes:
    return struct.pack("<f", value)


def planted_canaries(config: FederationConfig) -> Canaries:
    """Every canary ``plant_federation`` writes for ``config``."""
    texts = {f"marker {MARKER!r}": MARKER, **{f"PII {k}": v for k, v in PII.items()}}
    texts |= {f"{column} (undeclared value)": value for column, value in UNDECLARED.items()}
    texts |= {f"{FREE_TEXT_COLUMN} (free text)": f"{MARKER} free text about a customer", "protected group": GROUP}
    texts |= {f"id of {site.id}": f"{ID_PREFIX}{site.id}-" for site in config.sites}
    return Canaries(texts, NUMBERS)


def plant_federation(config: FederationConfig, rejected: Collection[str] = ()) -> None:
    """Plant canaries in every site's training and current windows.

    A training window gets only values its contract accepts, so it is trained on; the sites in
    ``rejected`` also get undeclared categories and labels, which fail their contract and so exercise
    the failure path (where a tool's message quoting the bad value is the classic leak). Current windows
    are never contract-checked, so they get every canary.
    """
    for site in config.sites:
        plant(site.data_path, site, undeclared=site.id in rejected)
        if site.current_path is not None:
            plant(site.current_path, site, undeclared=True)


def plant(path: Path, site: SiteConfig, *, undeclared: bool) -> None:
    """Rewrite one raw table of ``site`` with canaries in every column (see the module constants)."""
    frame = pd.read_csv(path)
    rows = list(PLANTED_ROWS)
    if len(frame) <= rows[-1]:
        raise ValueError(f"{path} has {len(frame)} rows; planting needs more than {rows[-1]}")
    if site.id_column:
        frame[site.id_column] = [f"{ID_PREFIX}{site.id}-{i:07d}" for i in range(len(frame))]
    for column, value in PII.items():
        frame[column] = value
    frame[FREE_TEXT_COLUMN] = f"{MARKER} free text about a customer"
    for column, number in NUMBERS.items():
        frame[column] = frame[column].astype("float64")  # integer columns too: a canary has decimals
        frame.loc[rows, column] = number
    if site.protected_attribute:
        frame.loc[rows, site.protected_attribute] = GROUP
    if undeclared:
        for column, value in UNDECLARED.items():
            frame[column] = frame[column].astype(object)
            frame.loc[rows, column] = value
    frame.to_csv(path, index=False)


@dataclass(frozen=True)
class Hit:
    path: Path
    where: str  # inside the file: an archive member, a table.column, or "" for the raw bytes
    label: str

    def __str__(self) -> str:
        return f"{self.path}{' [' + self.where + ']' if self.where else ''}: {self.label}"


@dataclass(frozen=True)
class Scan:
    files: tuple[Path, ...]
    hits: tuple[Hit, ...]

    def covers(self, place: Path) -> bool:
        """Whether ``place`` (a file, or a folder holding files) was scanned."""
        place = place.resolve()
        return any(f == place or place in f.parents for f in self.files)

    def report(self) -> str:
        return "\n".join(str(hit) for hit in self.hits)


def scan(roots: Iterable[Path], canaries: Canaries, skip: Iterable[Path] = ()) -> Scan:
    """Every file below ``roots`` (except below ``skip``), each searched in all its forms."""
    skipped = [p.resolve() for p in skip]
    listed = {p.resolve() for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()}
    files = sorted(f for f in listed if not any(s == f or s in f.parents for s in skipped))
    hits = [Hit(path, where, label) for path in files for where, label in _scan_file(path, canaries)]
    return Scan(tuple(files), tuple(dict.fromkeys(hits)))


def scan_text(text: str, name: str, canaries: Canaries) -> list[Hit]:
    """Captured output (a process's stdout/stderr) searched like a file's bytes."""
    return [Hit(Path(name), where, label) for where, label in _scan_blob(text.encode(), "", canaries, 0)]


def _scan_file(path: Path, canaries: Canaries) -> list[tuple[str, str]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # a server removed its temp file between listing and reading
        return []
    found = _scan_blob(data, "", canaries, 0)
    if data.startswith(b"SQLite format 3\x00"):
        found += _scan_sqlite(path, canaries)
    return found


def _scan_blob(data: bytes, where: str, canaries: Canaries, depth: int) -> list[tuple[str, str]]:
    found = [(where, label) for label, needle in canaries.byte_needles() if needle in data]
    lowered = data.lower()
    found += [(where, label) for label, needle in canaries.text_needles() if needle in lowered]
    if depth >= 3:
        return found
    for member, content in _unpacked(data):
        found += _scan_blob(content, f"{where}!{member}" if where else member, canaries, depth + 1)
    if data.startswith(b"PAR1"):
        found += [(f"{where}!{cell}" if where else cell, label) for cell, label in _parquet_hits(data, canaries)]
    return found


def _unpacked(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The members of a zip or gzip blob; nothing for other data."""
    if data.startswith(b"PK\x03\x04"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, archive.read(info)
    elif data.startswith(b"\x1f\x8b"):
        yield "gunzipped", gzip.decompress(data)


def _scan_sqlite(path: Path, canaries: Canaries) -> list[tuple[str, str]]:
    return [hit for cell, value in _sqlite_cells(path) for hit in _value_hits(cell, value, canaries, "REAL")]


def _sqlite_cells(path: Path) -> Iterator[tuple[str, object]]:
    """Every cell of every table, read-only (a server may still be writing; its WAL is read too)."""
    with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = db.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                yield from ((f"{table}.{column}", value) for column, value in zip(columns, row, strict=True))


def _parquet_hits(data: bytes, canaries: Canaries) -> list[tuple[str, str]]:
    """Each distinct value of each column (the file's pages are compressed, so its bytes hide them)."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    found = []
    for name in table.column_names:
        values = {v if isinstance(v, (str, bytes, float, int)) else repr(v) for v in table.column(name).to_pylist()}
        found += [hit for value in values for hit in _value_hits(f"column {name}", value, canaries, "a value")]
    return list(dict.fromkeys(found))


def _value_hits(where: str, value: object, canaries: Canaries, kind: str) -> list[tuple[str, str]]:
    """One decoded value: text and bytes are searched like a file's bytes, a float is compared with the numbers."""
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return _scan_blob(value, where, canaries, 1)
    if isinstance(value, float) and (label := canaries.number_label(value)):
        return [(where, f"{label} as {kind}")]
    return []
