"""Evidently's default per-column drift tests, computed directly with numpy and scipy.

Evidently's report recomputes every column's test three times (its preset's dataset metric, its
table and a ValueDrift per column) and builds a plotly figure per column; on a million rows that
is over ten times the statistics themselves. The summary that leaves a site needs only the
statistics, so they are computed here with the method Evidently would pick and the exact formula
of its ``stattests`` modules (Evidently 0.7), and Evidently runs only to write the HTML report.
When it does, ``quorum.evaluation.drift`` compares its verdicts with these and refuses to disagree.

The method depends on the reference size and the number of distinct values, as in Evidently's
``_get_default_stattest``: up to 1000 reference rows a test with a p-value (K-S, chi-square, or a
Z-test for two values), above it a distance (Wasserstein normed by the reference's standard
deviation, or Jensen-Shannon over value frequencies for categories and numbers with few values).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

Kind = Literal["numeric", "categorical"]
SMALL_REFERENCE_ROWS = 1000  # Evidently switches from tests to distances above this many reference rows
FEW_VALUES = 5  # numeric columns with at most this many distinct values are compared by frequency


@dataclass(frozen=True)
class ColumnTest:
    """One column's test as Evidently would report it: its display name, statistic, threshold, verdict."""

    method: str
    statistic: float
    threshold: float
    drifted: bool


def column_test(reference: pd.Series, current: pd.Series, kind: Kind, distinct: int) -> ColumnTest:
    """Test one column; both windows hold only present values and ``distinct`` counts them together."""
    return _pick(len(reference), kind, distinct)(reference, current)


def _pick(reference_rows: int, kind: Kind, distinct: int) -> Callable[[pd.Series, pd.Series], ColumnTest]:
    few = kind == "categorical" or distinct <= FEW_VALUES
    if reference_rows <= SMALL_REFERENCE_ROWS:
        if few:
            return chi_square if distinct > 2 else z_test
        return kolmogorov_smirnov
    return jensen_shannon if few else wasserstein_normed


def kolmogorov_smirnov(reference: pd.Series, current: pd.Series) -> ColumnTest:
    from scipy.stats import ks_2samp

    p_value = float(ks_2samp(reference.to_numpy(), current.to_numpy())[1])
    return ColumnTest("K-S p_value", p_value, 0.05, p_value <= 0.05)


def chi_square(reference: pd.Series, current: pd.Series) -> ColumnTest:
    from scipy.stats import chisquare

    ref_counts, cur_counts = _aligned_counts(reference, current)
    expected = ref_counts * (len(current) / len(reference))
    with warnings.catch_warnings():
        # A category new in the current window has an expected count of 0: infinite statistic, p = 0, as in Evidently.
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(chisquare(cur_counts, expected)[1])
    return ColumnTest("chi-square p_value", p_value, 0.05, p_value < 0.05)


def z_test(reference: pd.Series, current: pd.Series) -> ColumnTest:
    """Two-sided test of the difference between the shares of the first value (in sorted order)."""
    from scipy.stats import norm

    first = sorted(set(reference.unique()) | set(current.unique()))[0]
    n1, n2 = len(reference), len(current)
    p1 = float((reference != first).sum()) / n1
    p2 = float((current != first).sum()) / n2
    pooled = float(p1 * n1 + p2 * n2) / (n1 + n2)
    z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
    p_value = float(2 * (1 - norm.cdf(np.abs(z))))
    return ColumnTest("Z-test p_value", p_value, 0.05, p_value < 0.05)


def wasserstein_normed(reference: pd.Series, current: pd.Series) -> ColumnTest:
    from scipy.stats import wasserstein_distance

    ref, cur = reference.to_numpy(dtype=np.float64), current.to_numpy(dtype=np.float64)
    norm = max(float(np.std(ref)), 0.001)
    distance = float(wasserstein_distance(ref, cur)) / norm
    return ColumnTest("Wasserstein distance (normed)", distance, 0.1, distance >= 0.1)


def jensen_shannon(reference: pd.Series, current: pd.Series) -> ColumnTest:
    from scipy.spatial.distance import jensenshannon

    ref_counts, cur_counts = _aligned_counts(reference, current)
    distance = float(jensenshannon(ref_counts / len(reference), cur_counts / len(current)))
    return ColumnTest("Jensen-Shannon distance", distance, 0.1, distance >= 0.1)


def _aligned_counts(reference: pd.Series, current: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """How often each value occurs in each window, over the values of both (0 where a window lacks one)."""
    ref, cur = reference.value_counts(), current.value_counts()
    values = ref.index.union(cur.index)
    return (
        ref.reindex(values, fill_value=0).to_numpy(dtype=np.float64),
        cur.reindex(values, fill_value=0).to_numpy(dtype=np.float64),
    )
