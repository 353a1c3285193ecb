"""Requests at a site's service: raw rows in, the model matrix out, or a refusal naming columns only.

Rows come in the site's raw feature schema, as JSON objects keyed by column, or as one JSON list of
values per column (``{"columns": {...}}``: the cheaper shape for a batch). Processing is the
training path's (``quorum.tasks.features.to_matrix``): numeric values coerced to float with nulls
and unreadable values filled by the median the site's training split had, categorical values
compared as text against each configured domain (an unknown or null value matches none). It is
written with plain numpy, one column at a time, because a request of one row must cost well under a
millisecond here and a batch's cost must stay near the model's own;
``tests/test_serving.py`` checks it equals ``to_matrix`` on the same rows.

A row that carries a declared PII column is refused whole, and so is one with an unknown or
missing column. Refusals name columns, never a value: nothing a caller sends is repeated back,
printed or logged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import QuorumError
from quorum.configs.schema import FeatureConfig, SiteConfig


class RowRefused(QuorumError, ValueError):
    """A request the service will not score; ``status`` is the HTTP status it answers with."""

    headline = "Request refused"
    exit_code = 2

    def __init__(self, message: str, *, fix: str = "", status: int = 422) -> None:
        super().__init__(message, fix=fix)
        self.status = status


@dataclass(frozen=True)
class RowSchema:
    """What one site's service accepts: its feature columns, what it refuses, and how it fills nulls."""

    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...]
    fill: tuple[float, ...]  # per numeric column: the site's training median
    pii_columns: frozenset[str]
    passthrough: frozenset[str]  # id, target, protected attribute: accepted, never used as features

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.numeric, *(name for name, _ in self.categorical))

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(domain) for _, domain in self.categorical)


def row_schema(features: FeatureConfig, site: SiteConfig, fill: Sequence[float]) -> RowSchema:
    if len(fill) != len(features.numeric):
        raise ValueError(f"expected {len(features.numeric)} fill values, got {len(fill)}")
    passthrough = {c for c in (site.id_column, site.target, site.protected_attribute) if c}
    return RowSchema(
        numeric=tuple(features.numeric),
        categorical=tuple((name, tuple(domain)) for name, domain in features.categorical.items()),
        fill=tuple(float(v) for v in fill),
        pii_columns=frozenset(site.pii_columns),
        passthrough=frozenset(passthrough - set(features.columns)),
    )


def training_fill(processed_train: Path, features: FeatureConfig, fallback: Sequence[float]) -> tuple[float, ...]:
    """The per-column medians ``to_matrix`` filled nulls with on the site's training split.

    ``fallback`` (the federation's feature means, from the model) is used for a column the site
    has no value for, or when the site has no processed training data here.
    """
    if not processed_train.is_file():
        return tuple(float(v) for v in fallback[: len(features.numeric)])
    import pandas as pd

    frame = pd.read_parquet(processed_train, columns=list(features.numeric))
    medians = []
    for index, column in enumerate(features.numeric):
        values = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
        finite = values[np.isfinite(values)]
        medians.append(float(np.median(finite)) if finite.size else float(fallback[index]))
    return tuple(medians)


ROWS_FIX = 'send {"rows": [{"column": value, ...}, ...]} or {"columns": {"column": [value, ...], ...}}'


@dataclass(frozen=True)
class Batch:
    """A parsed request body: row objects, or one list of values per column (``size`` rows either way)."""

    size: int
    rows: Sequence[Mapping[str, Any]] | None = None
    columns: Mapping[str, Sequence[Any]] | None = None


def _loads(body: bytes) -> Any:
    """JSON through orjson (a Prefect dependency, several times faster on number arrays), else the stdlib."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - installed with Prefect
        return json.loads(body)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ValueError(str(error)) from None


def parse_body(body: bytes, max_rows: int) -> Batch:
    """``{"rows": [{column: value}, ...]}`` or ``{"columns": {column: [values]}}``; refusals say the shape."""
    try:
        payload = _loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RowRefused("the request body is not JSON", fix=ROWS_FIX, status=400) from None
    if isinstance(payload, dict) and "columns" in payload and "rows" not in payload:
        return _column_batch(payload["columns"], max_rows)
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not rows:
        raise RowRefused(
            'the request needs a non-empty list under "rows" (or lists under "columns")', fix=ROWS_FIX, status=400
        )
    _check_size(len(rows), max_rows)
    if not all(isinstance(row, dict) for row in rows):
        raise RowRefused("every row must be a JSON object keyed by column", fix=ROWS_FIX, status=400)
    return Batch(len(rows), rows=rows)


def _column_batch(columns: Any, max_rows: int) -> Batch:
    if not isinstance(columns, dict) or not columns or not all(isinstance(v, list) for v in columns.values()):
        raise RowRefused('"columns" must map each column to a list of values', fix=ROWS_FIX, status=400)
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1:
        raise RowRefused(
            "the columns hold different numbers of values", fix="send one value per row in every column", status=400
        )
    size = lengths.pop()
    if size == 0:
        raise RowRefused('the request needs at least one row under "columns"', fix=ROWS_FIX, status=400)
    _check_size(size, max_rows)
    return Batch(size, columns=columns)


def _check_size(size: int, max_rows: int) -> None:
    if size > max_rows:
        raise RowRefused(
            f"{size} rows in one request; at most {max_rows}", fix="split the batch (serving.max_rows)", status=413
        )


def _check_names(seen: set[str], schema: RowSchema) -> None:
    """Refuse PII and unknown columns, by name only."""
    pii = sorted(seen & schema.pii_columns)
    if pii:
        raise RowRefused(
            f"rows carry declared PII column(s) {', '.join(pii)}; nothing was scored",
            fix="remove PII columns before sending rows to the model",
        )
    unknown = sorted(seen - set(schema.columns) - schema.passthrough)
    if unknown:
        raise RowRefused(
            f"unknown column(s) {', '.join(unknown)}", fix=f"send only the feature columns: {', '.join(schema.columns)}"
        )


def check_columns(rows: Sequence[Mapping[str, Any]], schema: RowSchema) -> None:
    """Refuse the request if any row has a PII, unknown or missing column (names only in the message)."""
    seen: set[str] = set()
    for row in rows:
        seen.update(row)
    _check_names(seen, schema)
    wanted = set(schema.columns)
    for number, row in enumerate(rows):
        if not wanted <= row.keys():
            missing = [column for column in schema.columns if column not in row]
            raise RowRefused(
                f"row {number} lacks feature column(s) {', '.join(missing)}",
                fix="send every feature column; use null for an unknown value",
            )


def batch_matrix(batch: Batch, schema: RowSchema) -> NDArray[np.float32]:
    """Check a parsed body's columns (PII, unknown, missing: refused by name) and build its model matrix."""
    if batch.rows is not None:
        check_columns(batch.rows, schema)
        return rows_to_matrix(batch.rows, schema)
    columns = batch.columns or {}
    _check_names(set(columns), schema)
    missing = [column for column in schema.columns if column not in columns]
    if missing:
        raise RowRefused(
            f"the columns lack feature column(s) {', '.join(missing)}",
            fix="send every feature column; use null for an unknown value",
        )
    return columns_to_matrix(columns, batch.size, schema)


def rows_to_matrix(rows: Sequence[Mapping[str, Any]], schema: RowSchema) -> NDArray[np.float32]:
    """The model matrix of already checked rows: numeric columns, then one-hot blocks in domain order."""
    return columns_to_matrix({column: [row[column] for row in rows] for column in schema.columns}, len(rows), schema)


def columns_to_matrix(columns: Mapping[str, Sequence[Any]], size: int, schema: RowSchema) -> NDArray[np.float32]:
    """The model matrix of already checked columns, built one column at a time without pandas."""
    matrix = np.zeros((size, schema.width), dtype=np.float32)
    for j, column in enumerate(schema.numeric):
        matrix[:, j] = _numbers(columns[column], size, schema.fill[j])
    offset = len(schema.numeric)
    for column, domain in schema.categorical:
        _one_hot(matrix[:, offset : offset + len(domain)], columns[column], domain)
        offset += len(domain)
    return matrix


def _one_hot(block: NDArray[np.float32], values: Sequence[Any], domain: Sequence[str]) -> None:
    """Set ``block[i, k]`` where row i's value, as text, is ``domain[k]``; the lookups run in C (``map``),
    and only a column holding something other than strings (nulls, numbers) is turned into text first."""
    lookup = {option: k for k, option in enumerate(domain)}
    texts = values if set(map(type, values)) == {str} else [_text(value) for value in values]
    codes = np.fromiter(map(lookup.get, texts, repeat(-1)), dtype=np.int64, count=len(texts))
    hit = codes >= 0
    block[np.flatnonzero(hit), codes[hit]] = 1.0


def _numbers(values: Sequence[Any], size: int, fill: float) -> NDArray[np.float64]:
    """One numeric column: numpy converts a column of numbers, nulls and numeric text at C speed exactly as
    ``float()`` does; a column holding anything else (unreadable text, objects) goes value by value."""
    try:
        numbers = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        numbers = np.asarray([_number(value, fill) for value in values], dtype=np.float64)
    if numbers.shape != (size,):  # nested lists: a value per row is a number, never an array
        numbers = np.asarray([_number(value, fill) for value in values], dtype=np.float64)
    return np.where(np.isnan(numbers), fill, numbers)


def _number(value: Any, fill: float) -> float:
    """``pd.to_numeric(errors="coerce")`` for one JSON value, then the median for what is not a number."""
    try:
        if isinstance(value, (bool, int, float)):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            return fill
    except (ValueError, OverflowError):  # unreadable text, or an integer beyond any float
        return fill
    return number if not math.isnan(number) else fill


def _text(value: Any) -> str:
    """``astype("string").fillna("")`` for one JSON value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)
