"""Metrics combined from the counts sites send equal the same metrics on the pooled raw rows (sklearn).

Three sites of different sizes, base rates and score distributions reduce their test rows with the
real site function (``quorum.tasks.training.evaluate_local``); the coordinator's numbers from the merged
counts are compared with sklearn on the concatenated labels and scores. Threshold metrics and group
rates must match exactly; AUC and calibration error within their binning error.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score, roc_auc_score

from quorum.evaluation.metrics import HISTOGRAM_BINS, calibration_error
from quorum.evaluation.report import EvaluationReport, fairness_gaps
from quorum.tasks.training import evaluate_local

THRESHOLD = 0.5
SITES = {"north": (2400, 0.25, 1.4), "south": (700, 0.45, 0.8), "east": (150, 0.1, 2.0)}  # rows, base rate, signal


def _site_rows(seed: int, rows: int, base_rate: float, signal: float) -> tuple[np.ndarray, ...]:
    """Labels, probabilities (miscalibrated on purpose: a shift in the logit) and a protected group."""
    rng = np.random.default_rng(seed)
    groups = rng.choice(np.array(["female", "male", "other"]), rows, p=[0.5, 0.45, 0.05])
    labels = (rng.random(rows) < base_rate + 0.1 * (groups == "male")).astype(np.float32)
    logits = signal * (labels - 0.5) + rng.normal(0.3, 1.0, rows) + 0.4 * (groups == "female")
    return labels, 1 / (1 + np.exp(-logits)), groups


@pytest.fixture(scope="module")
def federation() -> tuple[EvaluationReport, np.ndarray, np.ndarray, np.ndarray]:
    rows = {site: _site_rows(seed, *shape) for seed, (site, shape) in enumerate(SITES.items())}
    report = EvaluationReport(
        sites=tuple(evaluate_local(site, s, y, g, THRESHOLD) for site, (y, s, g) in rows.items()),
        contracts_passed=dict.fromkeys(SITES, True),
    )
    labels, scores, groups = (np.concatenate([part[i] for part in rows.values()]) for i in range(3))
    return report, labels, scores, groups


def test_threshold_metrics_and_log_loss_match_sklearn_on_pooled_rows(federation) -> None:  # type: ignore[no-untyped-def]
    report, labels, scores, _ = federation
    predicted = scores >= THRESHOLD

    metrics = report.metrics

    assert metrics["examples"] == len(labels)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(labels, predicted), abs=1e-12)
    assert metrics["recall"] == pytest.approx(recall_score(labels, predicted), abs=1e-12)
    assert metrics["selection_rate"] == pytest.approx(predicted.mean(), abs=1e-12)
    assert metrics["log_loss"] == pytest.approx(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7)), rel=1e-9)


def test_auc_from_merged_histograms_is_within_its_binning_error(federation) -> None:  # type: ignore[no-untyped-def]
    report, labels, scores, _ = federation
    pooled = report.pooled
    positives, negatives = np.asarray(pooled.positive_hist), np.asarray(pooled.negative_hist)
    # Only pairs of a positive and a negative in the same bin are uncertain; each counts 1/2.
    binning_error = 0.5 * (positives * negatives).sum() / (positives.sum() * negatives.sum())

    assert abs(report.metrics["auc"] - roc_auc_score(labels, scores)) <= binning_error
    assert binning_error < 0.01


def test_calibration_error_is_within_half_a_bin_of_the_raw_ece(federation) -> None:  # type: ignore[no-untyped-def]
    report, labels, scores, _ = federation
    observed, predicted = calibration_curve(labels, scores, n_bins=HISTOGRAM_BINS, strategy="uniform")
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    in_bin = np.bincount(np.searchsorted(edges[1:-1], scores), minlength=HISTOGRAM_BINS)
    raw_ece = float((in_bin[in_bin > 0] * np.abs(predicted - observed)).sum() / len(labels))

    combined = report.metrics["calibration_error"]

    assert combined == calibration_error(report.pooled)
    assert abs(combined - raw_ece) <= 0.5 / HISTOGRAM_BINS
    assert raw_ece > 0.05  # the scores are miscalibrated on purpose, so agreement is not trivially 0 = 0


def test_group_rates_and_gaps_match_sklearn_per_group(federation) -> None:  # type: ignore[no-untyped-def]
    report, labels, scores, groups = federation
    predicted = scores >= THRESHOLD
    merged = report.group_counts()

    for name in ("female", "male", "other"):
        mine = groups == name
        counts = merged[name]
        assert counts.n == mine.sum()
        assert (counts.tp + counts.fp) / counts.n == pytest.approx(predicted[mine].mean(), abs=1e-12)
        assert counts.tp / (counts.tp + counts.fn) == pytest.approx(recall_score(labels[mine], predicted[mine]))

    big = ("female", "male")  # "other" has 5% of rows: below a min_group_size of 200 it is left out
    gaps = fairness_gaps(merged, min_group_size=200)
    rates = [predicted[groups == g].mean() for g in big]
    tprs = [recall_score(labels[groups == g], predicted[groups == g]) for g in big]
    assert merged["other"].n < 200
    assert gaps["selection_rate_gap"] == pytest.approx(max(rates) - min(rates), abs=1e-12)
    assert gaps["tpr_gap"] == pytest.approx(max(tprs) - min(tprs), abs=1e-12)
