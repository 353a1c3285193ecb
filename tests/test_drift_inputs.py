"""A site's drift check on a bad current window, end to end through ``quorum.tasks.site.monitor_site``.

The windows are small CSVs written the way a site's export would arrive; each bad one must give a
per-feature message in the summary (or one clear ``SiteDataError``), never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quorum.configs.errors import SiteDataError
from quorum.configs.schema import FederationConfig, load_federation
from quorum.evaluation.drift import DriftSummary
from quorum.tasks.features import to_matrix
from quorum.tasks.model import Weights, initial_weights
from quorum.tasks.site import TRAIN_FILE, monitor_site, preprocess_site
from quorum.tasks.wire import encode_drift
from tests.federation import write_federation

SITE = "alpha"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[FederationConfig, pd.DataFrame, Weights]:
    """One preprocessed site, its good current window, and seeded (untrained) champion weights."""
    root = tmp_path_factory.mktemp("drift-inputs")
    config = load_federation(write_federation(root, (SITE,), min_sites=1))
    assert preprocess_site(config, SITE).contract.passed
    current_path = config.site(SITE).current_path
    assert current_path is not None
    good = pd.read_csv(current_path).head(300)
    train = to_matrix(pd.read_parquet(config.site(SITE).processed_dir / TRAIN_FILE), config.features)
    mean, std = train.mean(axis=0).astype(np.float64), train.std(axis=0).astype(np.float64)
    champion = initial_weights(train.shape[1], config.model.hidden_sizes, mean, std, seed=1)
    return config, good, champion


def _monitor(site: tuple[FederationConfig, pd.DataFrame, Weights], window: pd.DataFrame) -> DriftSummary:
    config, _, champion = site
    path = config.site(SITE).current_path
    assert path is not None
    window.to_csv(path, index=False)
    return monitor_site(config, SITE, champion)


def _notes(summary: DriftSummary) -> dict[str, str]:
    return {feature.column: feature.note for feature in summary.features}


def test_good_window_checks_every_feature_and_the_scores(site) -> None:  # type: ignore[no-untyped-def]
    summary = _monitor(site, site[1])

    assert [f.column for f in summary.features] == list(site[0].features.columns)
    assert summary.prediction is not None
    assert summary.problems == ()


def test_missing_columns_are_named_and_prediction_drift_says_why_it_was_skipped(site) -> None:  # type: ignore[no-untyped-def]
    summary = _monitor(site, site[1].drop(columns=["income", "channel"]))

    assert "column 'income' missing from current window" in summary.problems
    assert "column 'channel' missing from current window" in summary.problems
    assert any(p.startswith("prediction drift not checked") and "income" in p for p in summary.problems)
    assert summary.prediction is None
    assert {f.column for f in summary.features} == set(site[0].features.columns) - {"income", "channel"}


def test_new_categories_are_counted_without_their_values(site) -> None:  # type: ignore[no-untyped-def]
    window = site[1].copy()
    window.loc[:39, "region_type"] = "lunar-colony"

    summary = _monitor(site, window)

    assert _notes(summary)["region_type"] == "new categories in current window: 1 values"
    assert summary.prediction is not None  # an unknown category scores like a missing one
    assert "lunar-colony" not in json.dumps(encode_drift(summary))


def test_constant_and_empty_columns_are_noted_per_feature(site) -> None:  # type: ignore[no-untyped-def]
    window = site[1].copy()
    window["tenure_months"] = 12  # one value in the whole window
    window["credit_score"] = np.nan  # exported empty

    summary = _monitor(site, window)

    assert _notes(summary)["tenure_months"] == "constant in current window"
    assert "column 'credit_score' has no values in the current window" in summary.problems
    assert "credit_score" not in _notes(summary)


def test_text_in_a_numeric_column_is_reported_not_raised(site) -> None:  # type: ignore[no-untyped-def]
    window = site[1].copy()
    window["age"] = "unknown"

    summary = _monitor(site, window)

    assert "column 'age' has no values in the current window" in summary.problems


def test_unlabelled_window_is_still_checked(site) -> None:  # type: ignore[no-untyped-def]
    """Labels arrive later than features; drift compares features and scores only."""
    window = site[1].drop(columns=["churned"])

    summary = _monitor(site, window)

    assert len(summary.features) == len(site[0].features.columns)


def test_too_few_rows_is_one_clear_site_data_error(site) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SiteDataError) as caught:
        _monitor(site, site[1].head(10))

    assert f"site '{SITE}' has 10 rows in its current window" in caught.value.message
    assert "drift.min_rows" in caught.value.fix


def test_no_feature_column_at_all_is_one_clear_site_data_error(site) -> None:  # type: ignore[no-untyped-def]
    window = site[1][["customer_id", "churned"]]

    with pytest.raises(SiteDataError, match="no column can be checked for drift"):
        _monitor(site, window)


def test_header_only_window_is_one_clear_site_data_error(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SiteDataError, match="header but no rows"):
        _monitor(site, site[1].head(0))
