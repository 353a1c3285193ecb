"""Requests at a site's service: raw rows in, the model matrix out, or a refusal naming columns only.

Rows come in the site's raw feature schema, as JSON objects keyed by column. Processing is the
training path's (``quorum.tasks.features.to_matrix``): numeric values coerced to float with nulls
and unreadable values filled by the median the site's training split had, categorical values
compared as text against each configured domain (an unknown or null value matches none). It is
written with plain numpy, because a request of one row must cost well under a millisecond here;
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


def parse_body(body: bytes, max_rows: int) -> list[Mapping[str, Any]]:
    """``{"rows": [{column: value, ...}, ...]}`` -> the rows; refusals say what shape is expected."""
    fix = 'send {"rows": [{"column": value, ...}, ...]}'
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RowRefused("the request body is not JSON", fix=fix, status=400) from None
    rows = payload.get("rows") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not rows:
        raise RowRefused('the request needs a non-empty list under "rows"', fix=fix, status=400)
    if len(rows) > max_rows:
        raise RowRefused(
            f"{len(rows)} rows in one request; at most {max_rows}", fix="split the batch (serving.max_rows)", status=413
        )
    if not all(isinstance(row, dict) for row in rows):
        raise RowRefused("every row must be a JSON object keyed by column", fix=fix, status=400)
    return rows


def check_columns(rows: Sequence[Mapping[str, Any]], schema: RowSchema) -> None:
    """Refuse the request if any row has a PII, unknown or missing column (names only in the message)."""
    seen: set[str] = set()
    for row in rows:
        seen.update(row)
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
    for number, row in enumerate(rows):
        missing = [column for column in schema.columns if column not in row]
        if missing:
            raise RowRefused(
                f"row {number} lacks feature column(s) {', '.join(missing)}",
                fix="send every feature column; use null for an unknown value",
            )


def rows_to_matrix(rows: Sequence[Mapping[str, Any]], schema: RowSchema) -> NDArray[np.float32]:
    """The model matrix of already checked rows: numeric columns, then one-hot blocks in domain order."""
    matrix = np.zeros((len(rows), schema.width), dtype=np.float64)
    for j, column in enumerate(schema.numeric):
        fill = schema.fill[j]
        matrix[:, j] = [_number(row[column], fill) for row in rows]
    offset = len(schema.numeric)
    for column, domain in schema.categorical:
        lookup = {value: k for k, value in enumerate(domain)}
        for i, row in enumerate(rows):
            k = lookup.get(_text(row[column]))
            if k is not None:
                matrix[i, offset + k] = 1.0
        offset += len(domain)
    return matrix.astype(np.float32)


def _number(value: Any, fill: float) -> float:
    """``pd.to_numeric(errors="coerce")`` for one JSON value, then the median for what is not a number."""
    if isinstance(value, (bool, int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return fill
    else:
        return fill
    return number if not math.isnan(number) else fill


def _text(value: Any) -> str:
    """``astype("string").fillna("")`` for one JSON value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)
