"""Drift checks: the mapping of a real Evidently report, the per-site check and the verdicts.

The fixture ``evidently_drift_report.json`` is a real ``snapshot.dict()`` from Evidently
0.7.23 (600 seeded rows; ``age`` and ``dose`` shifted, ``smoker`` re-balanced, the rest
unchanged; ``dose`` and ``bmi`` forced to the Wasserstein distance), so the mapping is
tested against what Evidently really emits, both p-value and distance methods included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from quorum.configs.errors import ReplyRejected, SiteDataError, ToolError
from quorum.configs.schema import DriftConfig
from quorum.evaluation.drift import (
    REPORT_FILENAME,
    DriftSummary,
    FeatureDrift,
    check_drift,
    retrain_decision,
    site_is_drifting,
    summary_from_report,
)
from quorum.tasks.wire import decode_drift, encode_drift

FIXTURE = Path(__file__).parent / "fixtures" / "evidently_drift_report.json"
CANARY = "CANARY-7f3a9c"
CONFIG = DriftConfig()


def _report() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _windows(rows: int = 600, seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference and current windows where only ``shifted`` moves."""
    rng = np.random.default_rng(seed)

    def frame(shift: float) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "shifted": rng.normal(shift, 1.0, rows),
                "steady": rng.normal(0.0, 1.0, rows),
                "region": rng.choice(["north", "south", "east"], rows),
            }
        )

    return frame(0.0), frame(1.0)


def _check(reference: pd.DataFrame, current: pd.DataFrame, **kwargs: Any) -> DriftSummary:
    options: dict[str, Any] = {"numeric": ["shifted", "steady"], "categorical": ["region"], "config": CONFIG}
    return check_drift(reference, current, site_id="site-a", **(options | kwargs))


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[DriftSummary, Path]:
    """One Evidently run shared by several tests: Evidently is the slow part."""
    reference, current = _windows()
    rng = np.random.default_rng(11)
    report_dir = tmp_path_factory.mktemp("site-a")
    summary = _check(
        reference,
        current,
        reference_scores=rng.beta(2, 5, len(reference)),
        current_scores=rng.beta(5, 2, len(current)),
        report_dir=report_dir,
    )
    return summary, report_dir


# --- summary_from_report on the saved real report ------------------------------------------


def test_fixture_maps_to_exact_columns_and_verdicts() -> None:
    features, share = summary_from_report(_report(), site_id="s", rows_reference=600, rows_current=600)

    assert [(f.column, f.method, f.drifted) for f in features] == [
        ("age", "K-S p_value", True),
        ("income", "K-S p_value", False),
        ("dose", "wasserstein", True),
        ("bmi", "wasserstein", False),
        ("region", "chi-square p_value", False),
        ("smoker", "Z-test p_value", True),
    ]
    assert share == pytest.approx(0.5)
    assert features[0].statistic < features[0].threshold  # p-value: small means drift
    assert features[2].statistic >= features[2].threshold  # distance: large means drift


def test_fixture_verdicts_agree_with_evidentlys_own_count() -> None:
    report = _report()
    (count,) = [m for m in report["metrics"] if m["config"]["type"].endswith("DriftedColumnsCount")]
    features, share = summary_from_report(report, site_id="s", rows_reference=600, rows_current=600)

    assert sum(f.drifted for f in features) == count["value"]["count"]
    assert share == pytest.approx(count["value"]["share"])


def test_metrics_are_selected_by_type_not_position() -> None:
    report = _report()
    reordered = {**report, "metrics": list(reversed(report["metrics"]))}

    features, _ = summary_from_report(reordered, site_id="s", rows_reference=600, rows_current=600)

    assert {f.column for f in features if f.drifted} == {"age", "dose", "smoker"}


@pytest.mark.parametrize(
    "report",
    [
        {},
        {"metrics": "nope"},
        {"metrics": [{"value": 1.0}]},
        {"metrics": [{"config": {"type": "evidently:metric_v2:DriftedColumnsCount"}, "value": {"count": 0}}]},
        {"metrics": [{"config": {"type": "evidently:metric_v2:ValueDrift", "column": "x"}, "value": 0.1}]},
    ],
)
def test_unknown_report_shape_is_a_tool_error(report: dict[str, Any]) -> None:
    with pytest.raises(ToolError, match="site 's'"):
        summary_from_report(report, site_id="s", rows_reference=1, rows_current=1)


def test_unknown_method_is_not_guessed() -> None:
    metric = {"type": "evidently:metric_v2:ValueDrift", "column": "x", "method": "mystery", "threshold": 0.1}
    with pytest.raises(ToolError, match="mystery"):
        summary_from_report(
            {"metrics": [{"config": metric, "value": 0.5}]}, site_id="s", rows_reference=1, rows_current=1
        )


def test_disagreeing_with_evidentlys_count_is_a_tool_error() -> None:
    report = _report()
    for metric in report["metrics"]:
        if metric["config"]["type"].endswith("DriftedColumnsCount"):
            metric["value"]["count"] = 5.0
    with pytest.raises(ToolError, match="Evidently counts 5"):
        summary_from_report(report, site_id="s", rows_reference=600, rows_current=600)


# --- check_drift on real data ----------------------------------------------------------------


def test_shifted_column_drifts_and_steady_one_does_not(scored: tuple[DriftSummary, Path]) -> None:
    summary, _ = scored

    assert [f.column for f in summary.features] == ["shifted", "steady", "region"]
    assert summary.drifted_columns == ("shifted",)
    assert summary.drift_share == pytest.approx(1 / 3)
    assert summary.features[0].method == "K-S p_value"
    assert (summary.rows_reference, summary.rows_current, summary.problems) == (600, 600, ())


def test_prediction_drift_is_reported_apart_from_features(scored: tuple[DriftSummary, Path]) -> None:
    summary, _ = scored

    assert summary.prediction is not None
    assert summary.prediction.column == "prediction" and summary.prediction.drifted
    assert "prediction" not in [f.column for f in summary.features]
    assert site_is_drifting(summary, CONFIG)


def test_html_report_stays_at_the_site_without_temp_files(scored: tuple[DriftSummary, Path]) -> None:
    _, report_dir = scored

    assert [p.name for p in report_dir.iterdir()] == [REPORT_FILENAME]
    html = (report_dir / REPORT_FILENAME).read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>") and "shifted" in html


def test_large_windows_use_distance_methods_with_the_same_verdicts() -> None:
    """Over 1000 reference rows Evidently switches to distances; check_drift cross-checks its count."""
    reference, current = _windows(rows=1200, seed=3)
    current["shifted"] = current["shifted"] - 0.7  # a smaller shift, still well over the 0.1 distance

    summary = _check(reference, current)

    assert {f.method for f in summary.features} == {"Wasserstein distance (normed)", "Jensen-Shannon distance"}
    assert summary.drifted_columns == ("shifted",)


def test_unchanged_scores_do_not_drift() -> None:
    reference, current = _windows(seed=5)
    rng = np.random.default_rng(5)

    summary = _check(reference, current, reference_scores=rng.random(600), current_scores=rng.random(600))

    assert summary.prediction is not None and not summary.prediction.drifted


def test_bad_columns_are_listed_and_the_rest_still_checked() -> None:
    reference, current = _windows()
    reference["flag"] = current["flag"] = 1.0
    reference["ratio"], current["ratio"] = 1.0, np.nan

    summary = _check(
        reference,
        current.drop(columns=["steady"]),
        numeric=["shifted", "steady", "flag", "ratio"],
        reference_scores=np.zeros(600),
    )

    assert summary.problems == (
        "column 'steady' missing from current window",
        "column 'flag' holds one constant value in both windows; nothing to compare",
        "column 'ratio' has no values in the current window",
        "prediction drift not checked: no scores for the current window",
    )
    assert [f.column for f in summary.features] == ["shifted", "region"]
    assert summary.prediction is None


def test_new_categories_are_counted_and_values_never_leave_the_site() -> None:
    reference, current = _windows()
    current.loc[:49, "region"] = CANARY
    current.loc[50:59, "region"] = CANARY + "-second"
    current.loc[60:64, "steady"] = np.nan

    summary = _check(reference, current)

    notes = {f.column: f.note for f in summary.features}
    assert notes["region"] == "new categories in current window: 2 values"
    assert notes["steady"] == "missing values ignored in current window: 5"
    assert "region" in summary.drifted_columns
    assert CANARY not in json.dumps(encode_drift(summary))


def test_constant_current_window_is_noted() -> None:
    reference, current = _windows()
    current["steady"] = 0.0

    summary = _check(reference, current)

    (steady,) = [f for f in summary.features if f.column == "steady"]
    assert steady.note == "constant in current window" and steady.drifted


def test_too_few_current_rows_names_site_rows_minimum_and_fix() -> None:
    reference, current = _windows()

    with pytest.raises(SiteDataError) as caught:
        _check(reference, current.head(12))

    error = caught.value
    assert "site-a" in error.message and "12 rows" in error.message and "30" in error.message
    assert "drift.min_rows" in error.fix


def test_nothing_checkable_is_a_site_data_error() -> None:
    reference, current = _windows()

    with pytest.raises(SiteDataError, match="no column can be checked.*'nope' missing from current"):
        _check(reference, current, numeric=["nope"], categorical=[])


def test_importing_the_module_does_not_import_evidently() -> None:
    code = "import sys, quorum.evaluation.drift; sys.exit('evidently' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


# --- pure verdicts -------------------------------------------------------------------------


def _summary(site_id: str, drifted: int, checked: int = 4, prediction: bool | None = None) -> DriftSummary:
    features = tuple(FeatureDrift(f"f{i}", "K-S p_value", 0.5, 0.05, i < drifted) for i in range(checked))
    scores = None if prediction is None else FeatureDrift("prediction", "K-S p_value", 0.01, 0.05, prediction)
    return DriftSummary(site_id, 100, 100, features, drifted / checked, scores, ())


def test_site_is_drifting_at_the_share_threshold_or_on_prediction() -> None:
    config = DriftConfig(drift_share=0.5)

    assert site_is_drifting(_summary("a", drifted=2), config)
    assert not site_is_drifting(_summary("a", drifted=1), config)
    assert site_is_drifting(_summary("a", drifted=0, prediction=True), config)
    assert not site_is_drifting(_summary("a", drifted=0, prediction=False), config)


def test_retrain_needs_k_drifting_sites_and_names_them() -> None:
    summaries = [_summary("north", drifted=3), _summary("south", drifted=0, prediction=True), _summary("east", 0)]

    retrain, reason = retrain_decision(summaries, DriftConfig(min_sites_to_retrain=2))
    assert retrain
    assert "2 of 3 sites" in reason and "north" in reason and "south" in reason and "east" not in reason

    retrain, reason = retrain_decision(summaries, DriftConfig(min_sites_to_retrain=3))
    assert not retrain and reason.startswith("no retrain") and "needs 3" in reason

    assert retrain_decision([], CONFIG)[0] is False
    assert retrain_decision([_summary("east", 0)], CONFIG) == (
        False,
        "no retrain: none of 1 sites drift (retrain needs 1)",
    )


def test_summary_round_trips_through_json() -> None:
    summary = _summary("north", drifted=1, prediction=True)
    summary = DriftSummary(**{**summary.__dict__, "problems": ("column 'x' missing from current window",)})

    assert decode_drift(json.loads(json.dumps(encode_drift(summary)))) == summary


@pytest.mark.parametrize("broken", [{}, {"features": "x"}, {"rows_current": "600"}, {"prediction": [1]}])
def test_malformed_summary_is_rejected(broken: dict[str, Any]) -> None:
    data = {**encode_drift(_summary("north", drifted=1)), **broken}
    if not broken:
        del data["site_id"]

    with pytest.raises(ReplyRejected, match="malformed drift summary"):
        decode_drift(data)


# --- our statistics against Evidently's report ---------------------------------------------------


def test_large_windows_agree_with_evidentlys_report_for_every_method(tmp_path: Path) -> None:
    """Distances over 1000 rows, for numbers, few-valued numbers, categories and scores alike.

    ``check_drift`` runs Evidently for the HTML report and raises if any verdict or statistic differs.
    """
    reference, current = _windows(rows=1500, seed=9)
    rng = np.random.default_rng(9)
    reference["flag"], current["flag"] = rng.integers(0, 2, 1500), (rng.random(1500) < 0.7).astype(int)
    reference["visits"], current["visits"] = rng.integers(1, 5, 1500), rng.integers(1, 5, 1500)

    summary = _check(
        reference,
        current,
        numeric=["shifted", "steady", "flag", "visits"],
        reference_scores=rng.beta(2, 5, 1500),
        current_scores=rng.beta(2.5, 5, 1500),
        report_dir=tmp_path,
    )

    methods = {f.column: f.method for f in summary.features}
    assert methods == {
        "shifted": "Wasserstein distance (normed)",
        "steady": "Wasserstein distance (normed)",
        "flag": "Jensen-Shannon distance",
        "visits": "Jensen-Shannon distance",
        "region": "Jensen-Shannon distance",
    }
    assert summary.prediction is not None and summary.prediction.method == "Wasserstein distance (normed)"
    assert (tmp_path / REPORT_FILENAME).is_file()


def test_small_windows_use_tests_with_p_values_like_evidently(tmp_path: Path) -> None:
    reference, current = _windows(rows=400, seed=4)
    reference["smoker"], current["smoker"] = np.repeat(["yes", "no"], 200), np.repeat(["yes", "no"], [120, 280])

    summary = _check(reference, current, categorical=["region", "smoker"], report_dir=tmp_path)

    methods = {f.column: f.method for f in summary.features}
    assert methods == {
        "shifted": "K-S p_value",
        "steady": "K-S p_value",
        "region": "chi-square p_value",
        "smoker": "Z-test p_value",
    }
    assert {"shifted", "smoker"} <= set(summary.drifted_columns)


def test_a_statistic_that_disagrees_with_evidently_is_a_tool_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import quorum.evaluation.drift as drift
    from quorum.evaluation.drift_stats import ColumnTest

    monkeypatch.setattr(drift, "column_test", lambda *args: ColumnTest("K-S p_value", 0.9, 0.05, False))
    reference, current = _windows()

    with pytest.raises(ToolError, match="disagrees.*shifted") as caught:
        _check(reference, current, report_dir=tmp_path)

    assert "drift_stats.py" in caught.value.fix
    assert not (tmp_path / REPORT_FILENAME).exists()  # a page contradicting the summary is not written


def test_html_report_can_be_switched_off(tmp_path: Path) -> None:
    reference, current = _windows()

    summary = _check(reference, current, config=DriftConfig(html_report=False), report_dir=tmp_path)

    assert summary.drifted_columns == ("shifted",)
    assert list(tmp_path.iterdir()) == []
