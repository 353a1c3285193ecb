"""Shareable counts, metrics merged exactly across sites, and the gates that decide on them."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from quorum.configs.schema import GatePolicy
from quorum.evaluation.gates import Verdict, decide
from quorum.evaluation.metrics import (
    HISTOGRAM_BINS,
    BinaryCounts,
    accuracy,
    auc,
    calibration_error,
    counts_from_scores,
    f1,
    log_loss,
    merge,
    precision,
    recall,
    selection_rate,
    summarize,
)
from quorum.evaluation.report import EvaluationReport, SiteEvaluation
from quorum.tasks.wire import decode_counts, encode_counts

# --- counts_from_scores ------------------------------------------------------------------------

LABELS = np.array([1, 1, 0, 0, 1, 0])
# Binary fractions, so each score falls exactly into a known histogram bin.
SCORES = np.array([0.875, 0.375, 0.125, 0.625, 0.5, 0.5])


def test_counts_from_scores_on_literal_pairs() -> None:
    counts = counts_from_scores(LABELS, SCORES)

    assert (counts.tp, counts.fp, counts.tn, counts.fn) == (2, 2, 1, 1)  # 0.5 counts as predicted positive
    assert counts.n == 6
    assert counts.loss_sum == pytest.approx(sk_log_loss(LABELS, SCORES) * 6)
    assert {i: v for i, v in enumerate(counts.positive_hist) if v} == {37: 1, 50: 1, 87: 1}
    assert {i: v for i, v in enumerate(counts.negative_hist) if v} == {12: 1, 50: 1, 62: 1}


def test_threshold_moves_the_decision() -> None:
    counts = counts_from_scores(LABELS, SCORES, threshold=0.6)

    assert (counts.tp, counts.fp, counts.tn, counts.fn) == (1, 1, 2, 2)


def test_extreme_scores_land_in_the_edge_bins_with_finite_loss() -> None:
    counts = counts_from_scores(np.array([1, 0]), np.array([1.0, 0.0]))

    assert counts.positive_hist[HISTOGRAM_BINS - 1] == 1
    assert counts.negative_hist[0] == 1
    assert math.isfinite(counts.loss_sum) and counts.loss_sum < 1e-5


def test_named_metrics_of_literal_counts() -> None:
    counts = BinaryCounts(tp=30, fp=10, tn=50, fn=10, loss_sum=40.0)

    assert accuracy(counts) == pytest.approx(0.8)
    assert precision(counts) == pytest.approx(0.75)
    assert recall(counts) == pytest.approx(0.75)
    assert f1(counts) == pytest.approx(0.75)
    assert selection_rate(counts) == pytest.approx(0.4)
    assert log_loss(counts) == pytest.approx(0.4)
    assert summarize(counts)["examples"] == 100.0


def test_metrics_of_empty_counts_are_zero_and_auc_is_nan() -> None:
    empty = BinaryCounts()

    metrics = summarize(empty)

    assert math.isnan(metrics.pop("auc"))
    assert set(metrics.values()) == {0.0}


# --- BinaryCounts ------------------------------------------------------------------------------


def test_counts_add_field_by_field() -> None:
    a = counts_from_scores(np.array([1, 0, 1]), np.array([0.9, 0.2, 0.3]))
    b = counts_from_scores(np.array([0, 0, 1]), np.array([0.7, 0.1, 0.8]))

    total = a + b

    assert (total.tp, total.fp, total.tn, total.fn) == (2, 1, 2, 1)
    assert total.loss_sum == pytest.approx(a.loss_sum + b.loss_sum)
    assert sum(total.positive_hist) == 3 and sum(total.negative_hist) == 3
    assert merge([a, b]) == total
    assert merge([]) == BinaryCounts()


def test_counts_round_trip_through_json() -> None:
    counts = counts_from_scores(LABELS, SCORES)

    restored = decode_counts(json.loads(json.dumps(encode_counts(counts))))

    assert restored == counts
    assert set(encode_counts(counts)) == {"tp", "fp", "tn", "fn", "loss_sum", "positive_hist", "negative_hist"}


# --- AUC from histograms -----------------------------------------------------------------------


def sample(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    scores = 1 / (1 + np.exp(-(rng.normal(0.0, 1.0, n) + 1.2 * labels - 0.5)))
    return labels, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_matches_sklearn(seed: int) -> None:
    labels, scores = sample(seed, 3000)

    assert auc(counts_from_scores(labels, scores)) == pytest.approx(roc_auc_score(labels, scores), abs=0.01)


def test_merged_site_counts_give_the_pooled_auc_exactly() -> None:
    labels, scores = sample(7, 2400)
    cuts = [0, 300, 1100, 2400]  # three sites of different sizes
    sites = [counts_from_scores(labels[lo:hi], scores[lo:hi]) for lo, hi in itertools.pairwise(cuts)]

    merged = merge(sites)
    pooled = counts_from_scores(labels, scores)

    assert auc(merged) == auc(pooled)
    assert (merged.tp, merged.fp, merged.tn, merged.fn) == (pooled.tp, pooled.fp, pooled.tn, pooled.fn)
    assert merged.positive_hist == pooled.positive_hist and merged.negative_hist == pooled.negative_hist
    assert merged.loss_sum == pytest.approx(pooled.loss_sum)
    site_mean_auc = float(np.mean([auc(s) for s in sites]))
    assert auc(merged) != site_mean_auc  # the pooled AUC is not an average of site AUCs


def test_auc_of_one_class_is_nan() -> None:
    assert math.isnan(auc(counts_from_scores(np.array([1, 1]), np.array([0.2, 0.9]))))


def test_auc_of_perfect_and_reversed_rankings() -> None:
    labels = np.array([0, 0, 1, 1])

    assert auc(counts_from_scores(labels, np.array([0.1, 0.2, 0.8, 0.9]))) == 1.0
    assert auc(counts_from_scores(labels, np.array([0.8, 0.9, 0.1, 0.2]))) == 0.0


# --- gates -------------------------------------------------------------------------------------

POLICY = GatePolicy(
    min_accuracy=0.7,
    min_auc=0.7,
    min_f1=None,
    max_log_loss=0.5,
    min_site_accuracy=0.6,
    max_regression=0.02,
    max_selection_rate_gap=0.2,
    max_tpr_gap=0.2,
    min_sites=2,
    min_examples=100,
)
GATE_NAMES = {"data_contracts", "sites", "examples", "accuracy", "auc", "log_loss", "selection_rate_gap", "tpr_gap"}


def counts(tp: int, fp: int, tn: int, fn: int, mean_loss: float = 0.3) -> BinaryCounts:
    """Predicted positives score 0.905, predicted negatives 0.105: AUC follows from the four counts."""
    positives, negatives = [0] * HISTOGRAM_BINS, [0] * HISTOGRAM_BINS
    positives[90], positives[10] = tp, fn
    negatives[90], negatives[10] = fp, tn
    return BinaryCounts(tp, fp, tn, fn, mean_loss * (tp + fp + tn + fn), tuple(positives), tuple(negatives))


GOOD_GROUP = counts(20, 5, 20, 5)  # n=50, accuracy 0.8, AUC 0.8, selection rate 0.5, TPR 0.8
LOSSY_GROUP = counts(20, 5, 20, 5, mean_loss=0.6)


def site(site_id: str, female: BinaryCounts = GOOD_GROUP, male: BinaryCounts = GOOD_GROUP) -> SiteEvaluation:
    return SiteEvaluation(site_id, female + male, {"female": female, "male": male})


def report(*sites: SiteEvaluation, failed_contract: str | None = None) -> EvaluationReport:
    contracts = {s.site_id: s.site_id != failed_contract for s in sites}
    if failed_contract and failed_contract not in contracts:
        contracts[failed_contract] = False
    return EvaluationReport(sites=sites, contracts_passed=contracts)


GOOD = report(site("a"), site("b"))
BETTER_CHAMPION = report(site("a", counts(24, 1, 24, 1), counts(24, 1, 24, 1)), site("b"))


def failed_names(verdict: Verdict) -> set[str]:
    return {g.name for g in verdict.failed}


def test_good_report_passes_every_gate() -> None:
    verdict = decide(GOOD, GOOD, POLICY)

    assert verdict.passed, verdict.headline()
    assert {g.name for g in verdict.gates} == {*GATE_NAMES, "worst_site_accuracy[a]", "auc_drop_vs_champion"}
    assert verdict.headline() == f"passed all {len(verdict.gates)} gates"


FAILING = {
    # pooled accuracy 0.8 under a floor of 0.85
    "accuracy-floor": (GOOD, None, {"min_accuracy": 0.85}, "accuracy", "accuracy 0.8000 < 0.8500"),
    # pooled AUC 0.8 under a floor of 0.85
    "auc-floor": (GOOD, None, {"min_auc": 0.85}, "auc", "auc 0.8000 < 0.8500"),
    # mean log loss 0.6 over a ceiling of 0.5
    "log-loss-ceiling": (
        report(site("a", LOSSY_GROUP, LOSSY_GROUP), site("b", LOSSY_GROUP, LOSSY_GROUP)),
        None,
        {},
        "log_loss",
        "log_loss 0.6000 > 0.5000",
    ),
    # site b (small) is at 0.55 while the pooled accuracy stays above 0.7
    "worst-site": (
        report(site("a", *[counts(40, 10, 40, 10)] * 2), site("b", *[counts(11, 9, 11, 9)] * 2)),
        None,
        {},
        "worst_site_accuracy[b]",
        "worst_site_accuracy[b] 0.5500 < 0.6000",
    ),
    # women are selected at 0.6, men at 0.32, with equal true-positive rates
    "selection-rate-gap": (
        report(*[site(s, counts(20, 10, 15, 5), counts(16, 0, 30, 4)) for s in ("a", "b")]),
        None,
        {},
        "selection_rate_gap",
        "selection_rate_gap 0.2800 > 0.2000",
    ),
    # equal selection rates, but the TPR is 0.8 for women and 0.7 for men
    "tpr-gap": (
        report(site("a", GOOD_GROUP, counts(14, 11, 19, 6)), site("b", GOOD_GROUP, counts(14, 11, 19, 6))),
        None,
        {"max_tpr_gap": 0.05},
        "tpr_gap",
        "tpr_gap 0.1000 > 0.0500",
    ),
    # site b's data broke its contract
    "data-contract": (
        report(site("a"), site("b"), failed_contract="b"),
        None,
        {},
        "data_contracts",
        "data contract failed at b",
    ),
    # only one site evaluated where two are required
    "too-few-sites": (report(site("a")), None, {}, "sites", "sites 1.0000 < 2.0000"),
    # 200 examples where 1000 are required
    "too-few-examples": (GOOD, None, {"min_examples": 1000}, "examples", "examples 200.0000 < 1000.0000"),
    # the champion's AUC is higher by more than max_regression
    "regression-vs-champion": (GOOD, BETTER_CHAMPION, {}, "auc_drop_vs_champion", "auc_drop_vs_champion"),
}


@pytest.mark.parametrize(
    ("candidate", "champion", "override", "gate", "reason"), list(FAILING.values()), ids=list(FAILING)
)
def test_each_gate_fails_on_its_own(
    candidate: EvaluationReport,
    champion: EvaluationReport | None,
    override: dict[str, float],
    gate: str,
    reason: str,
) -> None:
    policy = POLICY.model_copy(update=override)

    verdict = decide(candidate, champion, policy)

    assert not verdict.passed
    assert failed_names(verdict) == {gate}
    assert verdict.headline().startswith("failed: ")
    assert reason in verdict.headline()


def test_disabled_gates_are_skipped() -> None:
    off = GatePolicy(
        min_accuracy=None,
        min_auc=None,
        min_f1=None,
        max_log_loss=None,
        min_site_accuracy=None,
        max_regression=None,
        max_selection_rate_gap=None,
        max_tpr_gap=None,
    )
    awful = report(site("a", counts(0, 25, 0, 25, 5.0), counts(25, 0, 0, 25, 5.0)))

    verdict = decide(awful, BETTER_CHAMPION, off)

    assert verdict.passed, verdict.headline()
    assert {g.name for g in verdict.gates} == {"data_contracts", "sites", "examples"}


def test_a_nan_metric_fails_its_gate() -> None:
    only_negatives = counts(0, 5, 45, 0)  # one class: the AUC is undefined

    verdict = decide(
        report(site("a", only_negatives, only_negatives), site("b", only_negatives, only_negatives)), None, POLICY
    )

    assert "auc" in failed_names(verdict)


def test_verdict_dict_and_markdown_list_every_gate() -> None:
    policy = POLICY.model_copy(update={"min_f1": 0.9})  # f1 0.8 fails: both outcomes are rendered

    verdict = decide(GOOD, BETTER_CHAMPION, policy)

    data = json.loads(json.dumps(verdict.to_dict()))
    markdown = verdict.to_markdown()
    names = {g.name for g in verdict.gates}
    assert names == {*GATE_NAMES, "f1", "worst_site_accuracy[a]", "auc_drop_vs_champion"}
    assert {g["name"] for g in data["gates"]} == names
    assert data["passed"] is False
    for gate in verdict.gates:
        assert f"| {gate.name} |" in markdown
    assert markdown.startswith("# Verdict: FAILED")
    assert markdown.count("| FAIL |") == len(verdict.failed) == 2


# --- calibration, per-site regression, per-site fairness ------------------------------------------


def test_calibration_error_of_literal_counts() -> None:
    """Predicted positives sit in the 0.905 bin with 80% positives, predicted negatives in 0.105 with 20%."""
    assert calibration_error(GOOD_GROUP) == pytest.approx((25 * 0.105 + 25 * 0.095) / 50)
    assert calibration_error(BinaryCounts()) == 0.0


def test_calibration_ceiling_fails_on_its_own() -> None:
    verdict = decide(GOOD, None, POLICY.model_copy(update={"max_calibration_error": 0.05}))

    assert failed_names(verdict) == {"calibration_error"}
    assert "calibration_error 0.1000 > 0.0500" in verdict.headline()


@pytest.mark.parametrize(
    ("metric", "drop"),
    [("auc", 0.96 - 0.8), ("accuracy", 0.96 - 0.8)],  # site a: champion 24/25 right per group, candidate 20/25
)
def test_a_site_worse_than_the_champion_on_its_own_data_fails(metric: str, drop: float) -> None:
    # the pooled AUC gate is off, so only the per-site comparison can fail
    policy = POLICY.model_copy(
        update={"max_regression": None, "max_site_regression": 0.05, "site_regression_metric": metric}
    )

    verdict = decide(GOOD, BETTER_CHAMPION, policy)

    gate = f"site_{metric}_drop_vs_champion[a]"
    assert failed_names(verdict) == {gate}
    assert f"{gate} {drop:.4f} > 0.0500" in verdict.headline()


def test_site_regression_passes_within_the_margin_and_skips_sites_the_champion_never_saw() -> None:
    policy = POLICY.model_copy(update={"max_site_regression": 0.05})
    champion = report(site("a"))  # no result for site b

    verdict = decide(GOOD, champion, policy)

    assert verdict.passed, verdict.headline()
    [gate] = [g for g in verdict.gates if g.name.startswith("site_auc_drop")]
    assert gate.name == "site_auc_drop_vs_champion[a]" and gate.value == 0.0


# women selected at 0.6 and men at 0.32 at site a, the reverse at site b: pooled, the gap cancels out
OPPOSITE = report(
    site("a", counts(20, 10, 15, 5), counts(16, 0, 30, 4)), site("b", counts(16, 0, 30, 4), counts(20, 10, 15, 5))
)


def test_fairness_per_site_finds_gaps_that_pooling_hides() -> None:
    pooled_only = decide(OPPOSITE, None, POLICY)
    per_site = decide(OPPOSITE, None, POLICY.model_copy(update={"fairness_per_site": True}))

    assert pooled_only.passed, pooled_only.headline()
    assert failed_names(per_site) == {"selection_rate_gap[a]", "selection_rate_gap[b]"}
    assert {"tpr_gap[a]", "tpr_gap[b]"} <= {g.name for g in per_site.gates}


def test_groups_below_min_group_size_are_left_out_per_site() -> None:
    tiny = counts(1, 0, 2, 1)  # 4 people: a rate over them is noise
    candidate = report(site("a", GOOD_GROUP, tiny), site("b"))
    policy = POLICY.model_copy(update={"fairness_per_site": True, "min_group_size": 20})

    verdict = decide(candidate, None, policy)

    names = {g.name for g in verdict.gates}
    assert "selection_rate_gap[b]" in names and "selection_rate_gap[a]" not in names
    assert verdict.passed, verdict.headline()


# --- what the verdict says where --------------------------------------------------------------------


def test_version_tags_carry_every_gate_with_outcome_value_and_bound() -> None:
    verdict = decide(GOOD, BETTER_CHAMPION, POLICY.model_copy(update={"min_accuracy": 0.85}))

    tags = verdict.tags()

    assert set(tags) == {"gate." + g.name.replace("[", ".").rstrip("]") for g in verdict.gates}
    assert tags["gate.accuracy"] == "FAIL 0.8000 < 0.8500"
    assert tags["gate.auc"] == "pass 0.8000 >= 0.7000"
    assert tags["gate.worst_site_accuracy.a"] == "pass 0.8000 >= 0.6000"
    assert tags["gate.examples"] == "pass 200 >= 100"
    assert tags["gate.data_contracts"] == "pass 0 <= 0"


def test_failures_are_described_one_per_line_with_value_and_bound() -> None:
    verdict = decide(report(site("a")), None, POLICY.model_copy(update={"min_accuracy": 0.85}))

    lines = verdict.describe_failures().splitlines()

    assert lines == [
        "  - sites: FAIL 1 < 2 (sites 1.0000 < 2.0000)",
        "  - accuracy: FAIL 0.8000 < 0.8500 (accuracy 0.8000 < 0.8500)",
    ]


def test_an_undefined_metric_is_stored_as_null() -> None:
    one_class = counts(0, 5, 45, 0)
    verdict = decide(report(site("a", one_class, one_class), site("b", one_class, one_class)), None, POLICY)

    [auc_gate] = [g for g in verdict.to_dict()["gates"] if g["name"] == "auc"]  # type: ignore[attr-defined]

    assert auc_gate["value"] is None and auc_gate["passed"] is False
    json.dumps(verdict.to_dict(), allow_nan=False)  # what the audit log requires
