"""Evidently's drift report as our own typed results: per-column verdicts, without any data values.

The layer below both ``quorum.evaluation.drift`` (the check a site runs and the pure verdicts) and
``quorum.evaluation.drift_report`` (Evidently's HTML page and its agreement with our statistics), so
each of them imports this module and neither imports the other's internals. It needs no Evidently:
it reads a snapshot's ``dict()``, which the tests keep as a saved real report.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeGuard

import numpy as np

from quorum.configs.errors import ToolError

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


Scores = tuple[np.ndarray, np.ndarray]


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
    return features, share(features)


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
        fix="add the method to _RULE_TABLE in evaluation/drift_snapshot.py, following Evidently's stattests",
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
            fix="Evidently's drift rule changed; update _RULE_TABLE in evaluation/drift_snapshot.py",
        )


def share(features: Sequence[FeatureDrift]) -> float:
    return sum(feature.drifted for feature in features) / len(features) if features else 0.0
