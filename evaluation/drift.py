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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from quorum.configs.errors import SiteDataError
from quorum.configs.schema import DriftConfig
from quorum.evaluation.drift_report import write_html_report
from quorum.evaluation.drift_snapshot import (
    PREDICTION_COLUMN,
    REPORT_FILENAME,
    FeatureDrift,
    Scores,
    share,
    summary_from_report,
)
from quorum.evaluation.drift_stats import Kind, column_test


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


# --- Checking a site's data ---------------------------------------------------------------


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
        site_id, len(reference), len(current), features, share(features), prediction, problems + score_problems
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
