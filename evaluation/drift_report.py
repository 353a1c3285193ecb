"""Evidently's HTML drift report, written at the site, and its agreement with our statistics.

The report shows distributions, so it never leaves the site. It is the expensive part of a drift
check (Evidently computes each column's test three times and draws a figure per column), so it
runs only when asked (``drift.html_report`` and a report folder). Because the summary's statistics
come from ``quorum.evaluation.drift_stats`` and the page from Evidently, the two are compared here: a
report that contradicts the summary a site sent would be worse than no report.

Evidently is imported inside ``write_html_report`` only: its import takes seconds.
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from quorum.configs.errors import ToolError
from quorum.configs.schema import DriftConfig
from quorum.evaluation.drift_snapshot import (
    PREDICTION_COLUMN,
    REPORT_FILENAME,
    FeatureDrift,
    Scores,
    summary_from_report,
    value_drifts,
)
from quorum.evaluation.drift_stats import Kind


def write_html_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    kinds: Mapping[str, Kind],
    scores: Scores | None,
    *,
    expected: Sequence[FeatureDrift],
    config: DriftConfig,
    site_id: str,
    report_dir: Path,
) -> Path:
    """Run Evidently on the checked columns (and the scores), compare its verdicts, write the page."""
    ref_frame = reference.loc[:, list(kinds)].reset_index(drop=True)
    cur_frame = current.loc[:, list(kinds)].reset_index(drop=True)
    if scores is not None:
        ref_frame[PREDICTION_COLUMN], cur_frame[PREDICTION_COLUMN] = scores
    snapshot = _run_evidently(ref_frame, cur_frame, kinds, scores is not None, config, site_id)
    report = snapshot.dict()
    summary_from_report(report, site_id=site_id, rows_reference=len(reference), rows_current=len(current))
    _require_agreement(report, expected, site_id)
    return _save_html(snapshot, report_dir)


def _require_agreement(report: Mapping[str, Any], expected: Sequence[FeatureDrift], site_id: str) -> None:
    where = f"Evidently drift report for site '{site_id}'"
    theirs = {feature.column: feature for feature in value_drifts(report, where)}
    differing = [
        f"{ours.column} (ours: {ours.method} {ours.statistic:.6g}, Evidently: "
        + (f"{their.method} {their.statistic:.6g})" if (their := theirs.get(ours.column)) else "no result)")
        for ours in expected
        if not _same(ours, theirs.get(ours.column))
    ]
    if differing:
        raise ToolError(
            f"{where} disagrees with Quorum's drift statistics for: " + "; ".join(differing),
            fix="Evidently changed a default drift test; update evaluation/drift_stats.py to follow it",
        )


def _same(ours: FeatureDrift, theirs: FeatureDrift | None) -> bool:
    return (
        theirs is not None
        and theirs.method == ours.method
        and theirs.drifted == ours.drifted
        and math.isclose(theirs.statistic, ours.statistic, rel_tol=1e-6, abs_tol=1e-12)
    )


def _run_evidently(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: Mapping[str, str],
    with_prediction: bool,
    config: DriftConfig,
    site_id: str,
) -> Any:
    """One Evidently run over the columns that passed our checks."""
    with warnings.catch_warnings():
        # Evidently's own imports raise deprecation warnings (numpy.core, litestar) users cannot act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        from evidently import DataDefinition, Dataset, Report
        from evidently.metrics import ValueDrift
        from evidently.presets import DataDriftPreset

    numeric = [name for name, kind in columns.items() if kind == "numeric"]
    definition = DataDefinition(
        numerical_columns=numeric + ([PREDICTION_COLUMN] if with_prediction else []),
        categorical_columns=[name for name, kind in columns.items() if kind == "categorical"],
    )
    metrics: list[Any] = [DataDriftPreset(columns=list(columns), drift_share=config.drift_share)]
    if with_prediction:
        metrics.append(ValueDrift(column=PREDICTION_COLUMN))
    try:
        with warnings.catch_warnings():
            # Constant columns make numpy/scipy warn about 0/0 in correlations and chi-square.
            warnings.simplefilter("ignore", RuntimeWarning)
            return Report(metrics).run(
                Dataset.from_pandas(current, data_definition=definition),
                Dataset.from_pandas(reference, data_definition=definition),
            )
    except Exception as exc:  # Evidently raises bare ValueError/TypeError for data it rejects
        raise ToolError(
            f"Evidently failed to write the drift report for site '{site_id}': {type(exc).__name__}: {exc}",
            fix="check the column types in the site's data against federation.yaml, or set drift.html_report: false",
        ) from exc


def _save_html(snapshot: Any, report_dir: Path) -> Path:
    """Write the report atomically so a crash never leaves a half-written report at the site.

    Evidently's own ``save_html`` silently writes nothing when given a ``Path``, so the
    HTML string is written here instead.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    target = report_dir / REPORT_FILENAME
    # A unique name in the same folder keeps os.replace atomic; open() keeps the umask's mode.
    tmp = report_dir / f".{REPORT_FILENAME}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as out:
            out.write(snapshot.get_html_str(as_iframe=False))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
