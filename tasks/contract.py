"""Check a site's raw data against the federation's data contract with Great Expectations.

Two results come out of a check, with different audiences. The full Great Expectations
result quotes data values (unexpected values, sample rows), so it is only ever written to
the site's own report folder. The ``ContractSummary`` is what may travel to the coordinator
and into error messages, so it is built only from column names, counts, dtypes and bounds
taken from the config — never from a GE message or value list, which can quote raw data.

Great Expectations takes seconds to import, so it is imported on first use, not with this
module: commands that never check a contract should not pay for it. Its in-memory (ephemeral)
context, which writes no stores, is built once per process and shared by every site's check.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from quorum.configs.errors import SiteDataError, ToolError
from quorum.configs.schema import ContractConfig, FeatureConfig, SiteConfig

_REPORT_NAME = "contract_result.json"

# Pandas dtype names GE's type check resolves for numeric columns. The nullable extension
# dtypes must be named by their class ("Int64Dtype"): GE resolves names through numpy and
# then ``getattr(pandas, name)``, so the plain "Int64" alias silently matches nothing.
_NUMERIC_TYPES = (
    *(f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)),
    "float16",
    "float32",
    "float64",
    *(f"{kind}{bits}Dtype" for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)),
    "Float32Dtype",
    "Float64Dtype",
    "int",
    "float",
)
_LABEL_VALUES = (0, 1)

_PII_SAMPLE_SIZE = 1000
_PII_SHARE = 0.2
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# National numbers like (555) 123-4567 / 555.123.4567, or international ones like +44 20 7946 0958.
# Digit boundaries keep ISO dates, decimals and long ids from matching.
_PHONE = re.compile(
    r"(?<![\d+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]?\d{4}"
    r")(?!\d)"
)
_PII_KINDS = (("email addresses", _EMAIL), ("phone numbers", _PHONE))


@dataclass(frozen=True)
class FailedExpectation:
    """One broken rule, described without quoting any value from the data."""

    expectation: str
    column: str | None
    unexpected_count: int | None
    detail: str


@dataclass(frozen=True)
class ContractSummary:
    """The shareable outcome of a contract check: safe to send off-site and to print."""

    passed: bool
    evaluated: int
    failed: tuple[FailedExpectation, ...]
    warnings: tuple[str, ...]

    def describe(self) -> str:
        if not self.failed:
            return f"all {self.evaluated} contract expectations passed"
        return "\n".join(f"{item.column or '(table)'}: {item.expectation}: {item.detail}" for item in self.failed)


def build_suite_spec(features: FeatureConfig, contract: ContractConfig, site: SiteConfig) -> list[dict[str, Any]]:
    """The contract as plain GE expectation dicts, so it can be shown, hashed and tested without GE."""
    mostly = round(1.0 - contract.max_null_fraction, 12)
    spec: list[dict[str, Any]] = [
        _expect("table_row_count_to_be_between", min_value=contract.min_rows, max_value=contract.max_rows)
    ]
    spec += [_expect("column_to_exist", column=column) for column in _required_columns(features, site)]
    for column in features.numeric:
        spec.append(_expect("column_values_to_not_be_null", column=column, mostly=_mostly(contract, column, mostly)))
        spec.append(_expect("column_values_to_be_in_type_list", column=column, type_list=list(_NUMERIC_TYPES)))
        if column in contract.numeric_ranges:
            low, high = contract.numeric_ranges[column]
            spec.append(_expect("column_values_to_be_between", column=column, min_value=low, max_value=high))
    for column, domain in features.categorical.items():
        allowed = contract.categorical_domains.get(column, domain)  # the config checks it narrows `domain`
        spec.append(_expect("column_values_to_not_be_null", column=column, mostly=_mostly(contract, column, mostly)))
        spec.append(_expect("column_values_to_be_in_set", column=column, value_set=list(allowed)))
    low, high = contract.label_rate
    spec += [
        # An unlabelled row cannot be trained on and would silently shift the label rate.
        _expect("column_values_to_not_be_null", column=site.target, mostly=1.0),
        _expect("column_values_to_be_in_set", column=site.target, value_set=list(_LABEL_VALUES)),
        _expect("column_mean_to_be_between", column=site.target, min_value=low, max_value=high),
    ]
    if site.id_column:
        spec.append(_expect("column_values_to_be_unique", column=site.id_column))
    return spec


def _mostly(contract: ContractConfig, column: str, default: float) -> float:
    """GE's ``mostly`` for a column: its own null bound when the contract has one, else the global one."""
    if column in contract.null_fractions:
        return round(1.0 - contract.null_fractions[column], 12)
    return default


def _expect(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"type": f"expect_{name}", "kwargs": kwargs}


def _required_columns(features: FeatureConfig, site: SiteConfig) -> list[str]:
    named = (*features.columns, site.target, site.id_column, site.protected_attribute)
    return list(dict.fromkeys(column for column in named if column))


def validate_contract(
    frame: pd.DataFrame,
    features: FeatureConfig,
    contract: ContractConfig,
    site: SiteConfig,
    report_dir: Path | None = None,
) -> ContractSummary:
    """Check ``frame`` against the contract; the full GE result stays in ``report_dir`` at the site."""
    _reject_duplicate_columns(frame, site)
    spec = build_suite_spec(features, contract, site)
    result = _run_suite(_checked_columns(frame, features, site), spec, site)
    if report_dir is not None:
        _write_report(Path(report_dir), result.to_json_dict())
    failed = _summarise_failures(result.results, spec, frame, site)
    return ContractSummary(
        passed=not failed,
        evaluated=len(result.results),
        failed=failed,
        warnings=_pii_warnings(frame, site),
    )


def _checked_columns(frame: pd.DataFrame, features: FeatureConfig, site: SiteConfig) -> pd.DataFrame:
    """Only the columns the suite checks: GE copies the whole frame for every column rule it evaluates,
    so unchecked columns (hashed PII, free text, extra exports) cost time on each rule and add nothing."""
    checked = [column for column in _required_columns(features, site) if column in frame.columns]
    return frame if len(checked) == frame.shape[1] else frame[checked]


def _reject_duplicate_columns(frame: pd.DataFrame, site: SiteConfig) -> None:
    """GE checks only one of two same-named columns and reports success, so refuse them up front."""
    duplicated = sorted({str(name) for name in frame.columns[frame.columns.duplicated()]})
    if duplicated:
        raise SiteDataError(
            f"site {site.id!r}: the data has more than one column named {', '.join(map(repr, duplicated))}",
            fix="rename or drop the repeated columns so every column name is unique",
        )


# GE's context and its data sources are not safe to change from several threads, and sites are checked
# side by side in threads; GE's work is pure Python, so checking one site at a time costs no speed.
_CONTEXT_LOCK = threading.Lock()


def _run_suite(frame: pd.DataFrame, spec: list[dict[str, Any]], site: SiteConfig) -> Any:
    """Run the suite in the process's in-memory GE context, so nothing is written or sent anywhere."""
    gx = _import_great_expectations()
    try:
        suite = _suite(gx, spec, f"{site.id}-contract")
        with _CONTEXT_LOCK:
            source = _context(gx).data_sources.add_or_update_pandas(name=f"site-{site.id}")
            asset = source.add_dataframe_asset(name="raw")
            batch = asset.add_batch_definition_whole_dataframe("all-rows").get_batch(
                batch_parameters={"dataframe": frame}
            )
            return batch.validate(suite)
    except Exception as exc:
        raise ToolError(
            f"Great Expectations could not check the data contract of site {site.id!r} "
            f"({type(exc).__name__}; its message is withheld because it can quote data values)",
            fix="check that great_expectations 1.x is installed and the data loads as a plain pandas "
            "DataFrame with string column names; the chained traceback has GE's own message",
        ) from exc


@functools.lru_cache(maxsize=1)
def _context(gx: Any) -> Any:
    """One ephemeral GE context per process (in memory: no stores, no data docs on disk)."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _suite(gx: Any, spec: list[dict[str, Any]], name: str) -> Any:
    """The suite, built from expectation classes in one go.

    Classes, not dicts: GE logs and drops an invalid dict instead of raising. In one go, not with
    ``add_expectation``, which compares each new expectation with every earlier one (quadratic: seconds
    for a hundred). The suite is a set, so a repeated rule is kept once here too.
    """
    unique = {json.dumps(item, sort_keys=True, default=str): item for item in spec}
    expectations = [_expectation_class(gx, item["type"])(**item["kwargs"]) for item in unique.values()]
    suite = gx.ExpectationSuite(name=name, expectations=expectations)
    if len(suite.expectations) != len(expectations):
        raise ValueError(f"GE kept {len(suite.expectations)} of the suite's {len(expectations)} expectations")
    return suite


def _import_great_expectations() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    try:
        import great_expectations as gx
    except ImportError as exc:
        raise ToolError(
            f"great_expectations cannot be imported: {exc}",
            fix="install it in this environment: pip install 'great_expectations>=1,<2'",
        ) from exc
    # its INFO lines (temporary data-docs folders per context) say nothing a site operator can act on
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    return gx


def _expectation_class(gx: Any, expectation_type: str) -> Any:
    """Map ``expect_column_to_exist`` to ``gx.expectations.ExpectColumnToExist``."""
    return getattr(gx.expectations, "".join(part.title() for part in expectation_type.split("_")))


def _write_report(report_dir: Path, payload: Mapping[str, Any]) -> Path:
    """Write via a temp file and rename, so a reader never sees a half-written report."""
    report_dir.mkdir(parents=True, exist_ok=True)
    target = report_dir / _REPORT_NAME
    handle, temp_name = tempfile.mkstemp(dir=report_dir, prefix=f".{_REPORT_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2, default=str)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def _summarise_failures(
    results: Iterable[Any], spec: list[dict[str, Any]], frame: pd.DataFrame, site: SiteConfig
) -> tuple[FailedExpectation, ...]:
    """Failed results in suite order (GE returns them in its own order), with value-free details."""
    order = {(item["type"], item["kwargs"].get("column")): index for index, item in enumerate(spec)}
    failed = []
    for outcome in results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        kwargs = dict(config.kwargs)
        column = kwargs.get("column")
        facts = dict(outcome.result or {})
        missing = column is not None and column not in frame.columns
        failed.append(
            FailedExpectation(
                expectation=config.type,
                column=column,
                unexpected_count=None if missing else _as_count(facts.get("unexpected_count")),
                detail=_detail(config.type, kwargs, facts, frame, site, _raised(outcome.exception_info)),
            )
        )
    return tuple(sorted(failed, key=lambda item: order.get((item.expectation, item.column), len(order))))


def _raised(exception_info: Any) -> bool:
    """GE nests exception info per metric when a metric fails, and keeps it flat otherwise."""
    if not isinstance(exception_info, Mapping):
        return False
    if "raised_exception" in exception_info:
        return bool(exception_info["raised_exception"])
    return any(isinstance(info, Mapping) and info.get("raised_exception") for info in exception_info.values())


def _as_count(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _detail(
    kind: str, kwargs: Mapping[str, Any], facts: Mapping[str, Any], frame: pd.DataFrame, site: SiteConfig, raised: bool
) -> str:
    """Human text for one failure, from counts and config bounds only (GE text may quote values)."""
    column = kwargs.get("column")
    if column is not None and column not in frame.columns:
        return f"column {column!r} is missing"
    if raised:
        return "Great Expectations could not evaluate this rule on the column (see the full report at the site)"
    count = _count_text(facts.get("unexpected_count"))
    if kind == "expect_table_row_count_to_be_between":
        rows = _count_text(facts.get("observed_value"))
        return f"{rows} rows, the contract needs {_num(kwargs['min_value'])} to {_num(kwargs['max_value'])}"
    if kind == "expect_column_values_to_not_be_null":
        allowed = (1.0 - float(kwargs.get("mostly", 1.0))) * 100
        return f"{count} of {_count_text(facts.get('element_count'))} values are null, at most {allowed:g}% allowed"
    if kind == "expect_column_values_to_be_in_type_list":
        dtype = str(frame[column].dtype)
        if facts.get("unexpected_count") is not None:
            return f"{count} values are not numbers (column dtype {dtype})"
        return f"column dtype {dtype} is not numeric"
    if kind == "expect_column_values_to_be_between":
        return f"{count} values fall outside [{_num(kwargs['min_value'])}, {_num(kwargs['max_value'])}]"
    if kind == "expect_column_values_to_be_in_set" and column == site.target:
        return f"{count} values are not 0/1 labels"
    if kind == "expect_column_values_to_be_in_set":
        return f"{count} values are outside the allowed categories ({', '.join(map(str, kwargs['value_set']))})"
    if kind == "expect_column_mean_to_be_between":
        return f"the label rate is outside [{_num(kwargs['min_value'])}, {_num(kwargs['max_value'])}]"
    if kind == "expect_column_values_to_be_unique":
        return f"{count} rows share their id with another row"
    return f"{count} unexpected values"


def _count_text(value: Any) -> str:
    count = _as_count(value)
    return "an unknown number of" if count is None else str(count)


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _pii_warnings(frame: pd.DataFrame, site: SiteConfig) -> tuple[str, ...]:
    """Flag text columns that look like contact details the site has not declared as PII.

    Undeclared PII is not a contract failure (the column may never be used), but it must be
    visible: declared PII columns are the ones the rest of the pipeline knows to drop.
    """
    warnings = []
    for column in frame.columns:
        if not isinstance(column, str) or column in site.pii_columns or not _is_text(frame[column]):
            continue
        sample = [str(value) for value in frame[column].dropna().head(_PII_SAMPLE_SIZE)]
        for kind, pattern in _PII_KINDS:
            hits = sum(1 for value in sample if pattern.search(value))
            if sample and hits / len(sample) > _PII_SHARE:
                warnings.append(f"column {column!r} looks like it holds {kind} but is not listed in pii_columns")
    return tuple(warnings)


def _is_text(series: pd.Series) -> bool:
    dtype = series.dtype
    return bool(
        pd.api.types.is_object_dtype(dtype)
        or pd.api.types.is_string_dtype(dtype)
        or isinstance(dtype, pd.CategoricalDtype)
    )


def warm_up() -> None:
    """Import Great Expectations and build this process's context now (a site worker does this at start)."""
    _context(_import_great_expectations())
