"""Data and prediction drift per site, and the federation-wide decision to retrain.

Each site compares its current window with its reference window, column by column, with the
tests Evidently picks by default (``quorum.evaluation.drift_stats`` computes them directly, which is
several times faster than running Evidently's report). Only statistics, column names and counts
leave the site (a ``DriftSummary``); Evidently's full HTML report, which shows distributions and
therefore data, is written next to the site's data and stays there (``quorum.evaluation.drift_report``).
The verdicts (``site_is_drifting``, ``retrain_decision``) are pure so the coordinator can apply
them to summaries without Evidently, pandas data or network access.

Evidently is imported only when an HTML report is written: its import takes seconds, and most
callers of this module (the coordinator, the CLI) only need the pure verdicts.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

import numpy as np
import pandas as pd

from quorum.configs.errors import SiteDataError, ToolError
from quorum.configs.schema import DriftConfig
from quorum.evaluation.drift_stats import Kind, column_test

PREDICTION_COLUMN = "prediction"
REPORT_FILENAME = "drift_report.html"

_VALUE_DRIFT = "evidently:metric_v2:ValueDrift"
_DRIFTED_COUNT = "evidently:metric_v2:DriftedColumnsCount"

# How Evidently itself turns a method's statistic into a verdict (its stattests modules).
# The report names a method by its display name when Evidently picked it, but by the
# registry name when it was asked for one ("wasserstein"), so both are listed. Names are
# not enough to guess the direction: "Total-Variation-Distance" is a p-value, and K-S /
# Cramer-von Mises use <= where the other p-value tests use <.
_RULE_TABLE: tuple[tuple[str, str, Callable[[float, float], bool]], ...] = (
    ("K-S p_value", "ks", operator.le),
    ("chi-square p_value", "chisquare", operator.lt),
    ("Z-test p_value", "z", operator.lt),
    ("Anderson-Darling", "anderson", operator.lt),
    ("Cramer-von Mises", "cramer_von_mises", operator.le),
    ("Epps-Singleton", "es", operator.lt),
    ("Fisher's Exact test", "fisher_exact", operator.lt),
    ("g_test", "g_test", operator.lt),
    ("Mann-Whitney U-rank test", "mannw", operator.lt),
    ("empirical_mmd", "empirical_mmd", operator.lt),
    ("t_test", "t_test", operator.lt),
    ("Total-Variation-Distance", "TVD", operator.lt),
    ("Wasserstein distance (normed)", "wasserstein", operator.ge),
    ("Jensen-Shannon distance", "jensenshannon", operator.ge),
    ("Hellinger distance", "hellinger", operator.ge),
    ("Kullback-Leibler divergence", "kl_div", operator.ge),
    ("PSI", "psi", operator.ge),
    ("Energy-distance", "ed", operator.gt),
)
_DRIFT_RULES: Mapping[str, Callable[[float, float], bool]] = MappingProxyType(
    {name: rule for display, registered, rule in _RULE_TABLE for name in (display, registered)}
)


@dataclass(frozen=True)
class FeatureDrift:
    """One column's drift check, as Evidently judged it, without any data values."""

    column: str
    method: str
    statistic: float
    threshold: float
    drifted: bool
    note: str = ""


@dataclass(frozen=True)
class DriftSummary:
    """What a site reports about drift: safe to send to the coordinator and to log."""

    site_id: str
    rows_reference: int
    rows_current: int
    features: tuple[FeatureDrift, ...]
    drift_share: float
    prediction: FeatureDrift | None
    problems: tuple[str, ...]

    @property
    def drifted_columns(self) -> tuple[str, ...]:
        return tuple(feature.column for feature in self.features if feature.drifted)


# --- Evidently snapshot -> summary (pure) -------------------------------------------------


def summary_from_report(
    report: Mapping[str, Any], *, site_id: str, rows_reference: int, rows_current: int
) -> tuple[tuple[FeatureDrift, ...], float]:
    """Map an Evidently snapshot dict to per-column verdicts and the share that drifted.

    Metrics are picked by their type, never by position, because Evidently reorders and
    adds metrics between releases. When the report has a ``DriftedColumnsCount``, its
    column list selects the features (other ValueDrift metrics, such as the prediction,
    are left out) and its count must agree with ours: a mismatch means Evidently changed
    how it decides drift, and silently disagreeing with its own report would be worse.
    """
    where = (
        f"Evidently drift report for site '{site_id}' ({rows_reference} reference rows, {rows_current} current rows)"
    )
    metrics = _metrics(report, where)
    counts = [metric for metric in metrics if metric["config"]["type"] == _DRIFTED_COUNT]
    if len(counts) > 1:
        raise ToolError(f"{where} has {len(counts)} drifted-columns counts; expected at most one")
    wanted = _count_columns(counts[0], where) if counts else None
    features = tuple(feature for feature in _value_drifts(metrics, where) if wanted is None or feature.column in wanted)
    if not features:
        raise ToolError(f"{where} has no per-column drift results", fix="run it with DataDriftPreset")
    if counts:
        _check_count(counts[0], features, where)
    return features, _share(features)


def _metrics(report: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    metrics = report.get("metrics") if isinstance(report, Mapping) else None
    if not isinstance(metrics, list):
        raise ToolError(f"{where} has no 'metrics' list; is it a snapshot.dict() from Evidently 0.7?")
    for metric in metrics:
        config = metric.get("config") if isinstance(metric, Mapping) else None
        if not isinstance(config, Mapping) or not isinstance(config.get("type"), str):
            raise ToolError(f"{where} has a metric without a config type; unknown report shape")
    return metrics


def _count_columns(metric: Mapping[str, Any], where: str) -> frozenset[str] | None:
    columns = metric["config"].get("columns")
    if columns is None:
        return None
    if not isinstance(columns, list) or not all(isinstance(name, str) for name in columns):
        raise ToolError(f"{where} has a drifted-columns count with an unreadable column list")
    return frozenset(columns)


def value_drifts(report: Mapping[str, Any], where: str) -> tuple[FeatureDrift, ...]:
    """Every per-column result in an Evidently snapshot dict, features and prediction alike."""
    return _value_drifts(_metrics(report, where), where)


def _value_drifts(metrics: Sequence[Mapping[str, Any]], where: str) -> tuple[FeatureDrift, ...]:
    found = tuple(_value_drift(metric, where) for metric in metrics if metric["config"]["type"] == _VALUE_DRIFT)
    names = [feature.column for feature in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ToolError(f"{where} checks columns more than once: {', '.join(repeated)}")
    return found


def _value_drift(metric: Mapping[str, Any], where: str) -> FeatureDrift:
    config, value = metric["config"], metric.get("value")
    column, method, threshold = config.get("column"), config.get("method"), config.get("threshold")
    if not (isinstance(column, str) and isinstance(method, str) and _is_number(threshold) and _is_number(value)):
        raise ToolError(f"{where} has a ValueDrift metric without column, method, threshold and a numeric value")
    statistic, limit = float(value), float(threshold)
    return FeatureDrift(column, method, statistic, limit, _drift_rule(method, where)(statistic, limit))


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _drift_rule(method: str, where: str) -> Callable[[float, float], bool]:
    """Known methods follow Evidently exactly; an unknown one is only trusted if it says p-value."""
    rule = _DRIFT_RULES.get(method)
    if rule is not None:
        return rule
    if "p_value" in method:
        return operator.lt
    raise ToolError(
        f"{where} uses drift method '{method}', and Quorum does not know whether it is a p-value or a distance",
        fix="add the method to _RULE_TABLE in evaluation/drift.py, following Evidently's stattests",
    )


def _check_count(metric: Mapping[str, Any], features: Sequence[FeatureDrift], where: str) -> None:
    value = metric.get("value")
    count = value.get("count") if isinstance(value, Mapping) else None
    if not _is_number(count):
        raise ToolError(f"{where} has a drifted-columns count without a numeric count")
    ours = sum(feature.drifted for feature in features)
    if ours != int(count):
        raise ToolError(
            f"{where}: Evidently counts {int(count)} drifted columns but its per-column results give {ours}",
            fix="Evidently's drift rule changed; update _RULE_TABLE in evaluation/drift.py",
        )


def _share(features: Sequence[FeatureDrift]) -> float:
    return sum(feature.drifted for feature in features) / len(features) if features else 0.0


# --- Checking a site's data ---------------------------------------------------------------

Scores = tuple[np.ndarray, np.ndarray]


def check_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    site_id: str,
    numeric: Sequence[str],
    categorical: Sequence[str],
    config: DriftConfig,
    reference_scores: np.ndarray | None = None,
    current_scores: np.ndarray | None = None,
    report_dir: Path | None = None,
) -> DriftSummary:
    """Compare a site's current window with its reference window, column by column.

    A column that cannot be compared (missing, empty, wrong type, the same constant in
    both windows) is skipped and listed in ``problems`` so one bad column does not hide
    drift in the others; only when nothing is left to compare does the check fail.

    The statistics are Evidently's default tests computed directly (``quorum.evaluation.drift_stats``),
    one column at a time so at most one column's values are copied at once. Evidently itself runs
    only for the HTML report, written to ``report_dir`` when one is given and ``config.html_report``
    is on, and its verdicts must then agree with ours.
    """
    _require_rows(site_id, "current", len(current), config)
    _require_rows(site_id, "reference", len(reference), config)
    features, kinds, problems = _checked_columns(reference, current, numeric, categorical)
    if not features:
        raise SiteDataError(
            f"site '{site_id}': no column can be checked for drift: " + "; ".join(problems),
            fix="make the reference and current windows share the configured feature columns",
        )
    rows = (len(reference), len(current))
    prediction, scores, score_problems = _prediction_drift(kinds, reference_scores, current_scores, rows)
    if report_dir is not None and config.html_report:
        from quorum.evaluation.drift_report import write_html_report

        expected = features if prediction is None else (*features, prediction)
        write_html_report(
            reference,
            current,
            kinds,
            scores,
            expected=expected,
            config=config,
            site_id=site_id,
            report_dir=Path(report_dir),
        )
    return DriftSummary(
        site_id, len(reference), len(current), features, _share(features), prediction, problems + score_problems
    )


def _require_rows(site_id: str, window: str, rows: int, config: DriftConfig) -> None:
    if rows < config.min_rows:
        raise SiteDataError(
            f"site '{site_id}' has {rows} rows in its {window} window; drift needs at least {config.min_rows}",
            fix=f"collect more data for the {window} window, or lower drift.min_rows in federation.yaml",
        )


def _checked_columns(
    reference: pd.DataFrame, current: pd.DataFrame, numeric: Sequence[str], categorical: Sequence[str]
) -> tuple[tuple[FeatureDrift, ...], dict[str, Kind], tuple[str, ...]]:
    """Each comparable column's result and kind, and a message for each column that cannot be compared."""
    features: list[FeatureDrift] = []
    kinds: dict[str, Kind] = {}
    problems: list[str] = []
    seen: set[str] = set()
    both = set(numeric) & set(categorical)
    listed: list[tuple[str, Kind]] = [*((n, "numeric") for n in numeric), *((n, "categorical") for n in categorical)]
    for name, kind in listed:
        if name in seen:
            continue
        seen.add(name)
        if name in both:
            problems.append(f"column '{name}' is listed as both numeric and categorical")
            continue
        result = _column(name, kind, reference, current)
        if isinstance(result, str):
            problems.append(result)
        else:
            features.append(result)
            kinds[name] = kind
    return tuple(features), kinds, tuple(problems)


def _column(name: str, kind: Kind, reference: pd.DataFrame, current: pd.DataFrame) -> FeatureDrift | str:
    """The column's drift result, or why it cannot be compared."""
    for window, frame in (("current", current), ("reference", reference)):
        if name not in frame.columns:
            return f"column '{name}' missing from {window} window"
        if kind == "numeric" and not pd.api.types.is_numeric_dtype(frame[name]):
            return f"column '{name}' is not numeric in the {window} window (dtype {frame[name].dtype})"
    return _test(name, kind, reference[name], current[name])


def _test(name: str, kind: Kind, reference: pd.Series, current: pd.Series) -> FeatureDrift | str:
    ref, cur = _present(reference), _present(current)
    for window, values in (("current", cur), ("reference", ref)):
        if values.empty:
            return f"column '{name}' has no values in the {window} window"
    ref_values, cur_values = pd.unique(ref.to_numpy()), pd.unique(cur.to_numpy())
    distinct = len(pd.unique(np.concatenate([ref_values, cur_values])))
    if distinct == 1:
        return f"column '{name}' holds one constant value in both windows; nothing to compare"
    notes = []
    if len(cur_values) == 1:
        notes.append("constant in current window")
    elif len(ref_values) == 1:
        notes.append("constant in reference window")
    new = distinct - len(ref_values)
    if kind == "categorical" and new:
        notes.append(f"new categories in current window: {new} values")  # a count: values never leave the site
    missing = len(current) - len(cur)
    if missing:
        notes.append(f"missing values ignored in current window: {missing}")
    test = column_test(ref, cur, kind, distinct)
    return FeatureDrift(name, test.method, test.statistic, test.threshold, test.drifted, "; ".join(notes))


def _present(series: pd.Series) -> pd.Series:
    """The values Evidently compares: it drops missing and infinite values first (copying only if there are any)."""
    if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return series.dropna() if series.hasnans else series
    if isinstance(series.dtype, np.dtype):
        values = np.asarray(series, dtype=np.float64)  # no copy for float64 columns
    else:  # a nullable extension dtype: its missing values become NaN here
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(values)
    return series if finite.all() else series[finite]


def _prediction_drift(
    kinds: Mapping[str, Kind],
    reference_scores: np.ndarray | None,
    current_scores: np.ndarray | None,
    rows: tuple[int, int],
) -> tuple[FeatureDrift | None, Scores | None, tuple[str, ...]]:
    """Drift of the model's scores, as one more numeric column, with the scores it was computed on.

    Score problems are reported, not raised: feature drift is still worth having without them.
    """
    if reference_scores is None and current_scores is None:
        return None, None, ()
    skip = "prediction drift not checked: "
    if reference_scores is None or current_scores is None:
        missing = "reference" if reference_scores is None else "current"
        return None, None, (skip + f"no scores for the {missing} window",)
    if PREDICTION_COLUMN in kinds:
        return None, None, (skip + f"a feature is already named '{PREDICTION_COLUMN}'",)
    windows = []
    for window, scores, expected in (("reference", reference_scores, rows[0]), ("current", current_scores, rows[1])):
        try:
            values = np.asarray(scores, dtype=float)
        except (TypeError, ValueError):
            return None, None, (skip + f"{window} scores are not numbers",)
        if values.shape != (expected,):
            return None, None, (skip + f"{window} scores have shape {values.shape}, expected one per row ({expected})",)
        windows.append(values)
    result = _test(PREDICTION_COLUMN, "numeric", pd.Series(windows[0]), pd.Series(windows[1]))
    if isinstance(result, str):
        return None, None, (skip + result,)
    return result, (windows[0], windows[1]), ()


# --- Verdicts (pure) ----------------------------------------------------------------------


def site_is_drifting(summary: DriftSummary, config: DriftConfig) -> bool:
    """A site drifts when enough of its features moved, or when the model's scores moved.

    Score drift counts on its own because it is the change that matters most for the model,
    even when each feature moved too little to cross its threshold.
    """
    prediction_drifted = summary.prediction is not None and summary.prediction.drifted
    return summary.drift_share >= config.drift_share or prediction_drifted


def retrain_decision(summaries: Sequence[DriftSummary], config: DriftConfig) -> tuple[bool, str]:
    """Retrain only when enough sites drift, so one odd site does not retrain the federation.

    A site with several summaries counts once, as drifting if any of them drifts.
    """
    if not summaries:
        return False, "no retrain: no site reported drift results"
    sites = sorted({summary.site_id for summary in summaries})
    drifting = sorted({s.site_id for s in summaries if site_is_drifting(s, config)})
    need = config.min_sites_to_retrain
    if not drifting:
        return False, f"no retrain: none of {len(sites)} sites drift (retrain needs {need})"
    reasons = "; ".join(_site_reason(s) for s in summaries if s.site_id in drifting and site_is_drifting(s, config))
    verdict = "retrain" if len(drifting) >= need else "no retrain"
    return (
        len(drifting) >= need,
        f"{verdict}: {len(drifting)} of {len(sites)} sites drift (retrain needs {need}): {reasons}",
    )


def _site_reason(summary: DriftSummary) -> str:
    parts = []
    if summary.features:
        drifted = ", ".join(summary.drifted_columns) or "none"
        parts.append(f"{summary.drift_share:.0%} of columns drifted ({drifted})")
    if summary.prediction is not None and summary.prediction.drifted:
        parts.append("prediction drifted")
    return f"{summary.site_id}: " + " and ".join(parts)


__all__ = [
    "PREDICTION_COLUMN",
    "REPORT_FILENAME",
    "DriftSummary",
    "FeatureDrift",
    "check_drift",
    "retrain_decision",
    "site_is_drifting",
    "summary_from_report",
]
