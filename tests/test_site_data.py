"""A site's raw table: reading it safely, dropping PII, cleaning, the model matrix, splits and moments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quorum.configs.errors import SiteDataError
from quorum.configs.schema import FeatureConfig, SiteConfig
from quorum.tasks.data import read_table, require_columns
from quorum.tasks.features import (
    GROUP,
    LABEL,
    Moments,
    clean,
    feature_names,
    merge_moments,
    schema_hash,
    split_train_test,
    to_matrix,
)
from quorum.tasks.pii import drop_pii
from quorum.tasks.synth import PROFILES, SiteProfile, synth_site

FEATURES = FeatureConfig(
    numeric=("age", "income"),
    categorical={"region": ("urban", "suburban", "rural"), "channel": ("online", "branch")},
)
SITE = SiteConfig(
    id="north",
    root=Path("/nonexistent/north"),
    target="churned",
    id_column="customer_id",
    pii_columns=("name", "email", "fax"),
    protected_attribute="gender",
)


def raw_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": ["c1", "c2", "c3"],
            "name": ["Ada Smith", "Ben Kim", "Chen Rossi"],
            "email": ["ada@example.org", "ben@example.org", "chen@example.org"],
            "age": [30, 40, 50],
            "income": [1000.0, np.nan, 3000.0],
            "region": ["rural", "urban", "suburban"],
            "channel": ["branch", "online", "branch"],
            "gender": ["female", None, "male"],
            "churned": [1, 0, 0],
        }
    )


# --- read_table --------------------------------------------------------------------------------

BAD_FILES = {
    # no file at the configured path
    "missing": ("train.csv", None, "does not exist"),
    # an export that wrote nothing
    "empty": ("train.csv", b"", "is empty (0 bytes)"),
    # blank lines only: no header either
    "blank-lines": ("train.csv", b"\n\n", "has no header or rows"),
    # a header and no data rows
    "header-only": ("train.csv", b"age,churned\n", "has a header but no rows"),
    # a row with more fields than the header
    "too-many-fields": ("train.csv", b"age,churned\n30,1\n40,0,7\n", "is malformed or truncated"),
    # a file cut off inside a quoted field
    "unterminated-quote": ("train.csv", b'age,note\n30,"cut off\n', "is malformed or truncated"),
    # Latin-1 bytes where UTF-8 is expected
    "not-utf8": ("train.csv", b"age,city\n30,Z\xfcrich\n", "is not UTF-8 text"),
    # a spreadsheet export
    "unsupported-extension": ("train.xlsx", b"PK\x03\x04", "has unsupported type '.xlsx'"),
    # a CSV renamed to .parquet
    "bad-parquet": ("train.parquet", b"age,churned\n30,1\n", "cannot be read"),
}


@pytest.mark.parametrize(("name", "content", "fragment"), list(BAD_FILES.values()), ids=list(BAD_FILES))
def test_unusable_file_is_a_site_data_error_naming_the_file(
    tmp_path: Path, name: str, content: bytes | None, fragment: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(SiteDataError) as caught:
        read_table(path, "north")

    assert caught.value.message.startswith(f"site north: {path} ")
    assert fragment in caught.value.message
    assert caught.value.fix
    assert caught.value.exit_code == 3


def test_reading_a_bad_file_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"age,churned\n30,1\n40,0,7\n")

    with pytest.raises(SiteDataError):
        read_table(path, "north")

    assert [p.name for p in tmp_path.iterdir()] == ["train.csv"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".pq"])
def test_csv_and_parquet_are_read(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"age": [30, 40], "region": ["urban", "rural"], "churned": [1, 0]})
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)

    read = read_table(path, "north")

    pd.testing.assert_frame_equal(read, frame, check_dtype=False)


def test_require_columns_names_the_missing_ones(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"

    with pytest.raises(SiteDataError) as caught:
        require_columns(raw_frame(), ["age", "churned", "tenure", "score"], path, "north")

    assert "lacks column(s) tenure, score" in caught.value.message
    assert str(path) in caught.value.message


def test_require_columns_accepts_a_complete_frame_and_matches_names_exactly(tmp_path: Path) -> None:
    frame = raw_frame()
    before = frame.copy()

    assert require_columns(frame, list(frame.columns), tmp_path / "train.csv", "north") is None
    pd.testing.assert_frame_equal(frame, before)  # checking drops, renames or reorders nothing
    with pytest.raises(SiteDataError, match=r"lacks column\(s\) Age$"):
        require_columns(frame, ["age", "Age"], tmp_path / "train.csv", "north")  # case counts: no fuzzy match


# --- PII and cleaning --------------------------------------------------------------------------


def test_drop_pii_drops_the_listed_columns_only() -> None:
    raw = raw_frame()

    kept = drop_pii(raw, SITE)

    assert list(kept.columns) == ["customer_id", "age", "income", "region", "channel", "gender", "churned"]
    assert "name" in raw.columns  # the input frame is left alone


def test_clean_keeps_features_label_and_group() -> None:
    frame = clean(drop_pii(raw_frame(), SITE), SITE, FEATURES)

    assert list(frame.columns) == ["age", "income", "region", "channel", LABEL, GROUP]
    assert frame[LABEL].tolist() == [1, 0, 0]
    assert frame[LABEL].dtype == np.int8
    assert frame[GROUP].tolist() == ["female", "unknown", "male"]
    assert frame["age"].dtype == np.float64


def test_clean_without_protected_attribute_puts_everyone_in_one_group() -> None:
    site = SITE.model_copy(update={"protected_attribute": None})

    assert set(clean(raw_frame(), site, FEATURES)[GROUP]) == {"all"}


@pytest.mark.parametrize(
    "labels",
    [
        [1, 2, 0],  # a count, not a flag
        ["yes", "no", "no"],  # text labels
        [1, None, 0],  # an unlabelled row
        [1, -1, 0],  # -1/1 encoding
    ],
    ids=["two", "text", "missing", "minus-one"],
)
def test_clean_rejects_a_target_that_is_not_0_or_1(labels: list[object]) -> None:
    raw = raw_frame().assign(churned=labels)

    with pytest.raises(SiteDataError) as caught:
        clean(raw, SITE, FEATURES)

    assert "'churned'" in caught.value.message and "not 0/1" in caught.value.message


@pytest.mark.parametrize(
    "labels", [[1.0, 0.0, 0.0], ["1", "0", "0"], [True, False, False]], ids=["float", "str", "bool"]
)
def test_clean_accepts_other_spellings_of_0_and_1(labels: list[object]) -> None:
    assert clean(raw_frame().assign(churned=labels), SITE, FEATURES)[LABEL].tolist() == [1, 0, 0]


# --- the model matrix --------------------------------------------------------------------------


def test_to_matrix_follows_the_configured_domain_order_and_imputes_the_median() -> None:
    frame = clean(raw_frame(), SITE, FEATURES)

    matrix = to_matrix(frame, FEATURES)

    assert feature_names(FEATURES) == [
        "age",
        "income",
        "region=urban",
        "region=suburban",
        "region=rural",
        "channel=online",
        "channel=branch",
    ]
    np.testing.assert_array_equal(
        matrix,
        np.array(
            [
                [30, 1000, 0, 0, 1, 0, 1],
                [40, 2000, 1, 0, 0, 1, 0],  # income NaN -> median of 1000 and 3000
                [50, 3000, 0, 1, 0, 0, 1],
            ],
            dtype=np.float32,
        ),
    )
    assert matrix.dtype == np.float32


def test_to_matrix_layout_does_not_depend_on_row_order() -> None:
    frame = clean(raw_frame(), SITE, FEATURES)

    reversed_rows = to_matrix(frame.iloc[::-1].reset_index(drop=True), FEATURES)

    np.testing.assert_array_equal(reversed_rows, to_matrix(frame, FEATURES)[::-1])


def test_unknown_category_is_an_all_zero_block_and_all_null_numeric_is_zero() -> None:
    frame = clean(raw_frame().assign(region="coastal", income=np.nan), SITE, FEATURES)

    matrix = to_matrix(frame, FEATURES)

    np.testing.assert_array_equal(matrix[:, 1], [0, 0, 0])
    np.testing.assert_array_equal(matrix[:, 2:5], np.zeros((3, 3)))


def test_missing_category_is_an_all_zero_block() -> None:
    # the contract allows up to max_null_fraction nulls in a categorical column
    frame = clean(raw_frame().assign(region=["rural", None, "urban"]), SITE, FEATURES)

    matrix = to_matrix(frame, FEATURES)

    np.testing.assert_array_equal(matrix[1, 2:5], [0, 0, 0])


def test_schema_hash_depends_on_the_layout_only() -> None:
    reordered = FeatureConfig(
        numeric=("age", "income"),
        categorical={"region": ("rural", "suburban", "urban"), "channel": ("online", "branch")},
    )

    assert schema_hash(FEATURES) == schema_hash(FeatureConfig(**FEATURES.model_dump()))
    assert schema_hash(FEATURES) != schema_hash(reordered)


# --- split and moments -------------------------------------------------------------------------


def labelled(n: int = 40, positives: int = 8) -> pd.DataFrame:
    return pd.DataFrame({"row": range(n), LABEL: [1] * positives + [0] * (n - positives)})


def test_split_is_deterministic_per_seed() -> None:
    frame = labelled()

    first = split_train_test(frame, 0.25, seed=3)
    again = split_train_test(frame, 0.25, seed=3)
    other = split_train_test(frame, 0.25, seed=4)

    pd.testing.assert_frame_equal(first[0], again[0])
    pd.testing.assert_frame_equal(first[1], again[1])
    assert set(first[1]["row"]) != set(other[1]["row"])


def test_split_is_stratified_and_partitions_the_rows() -> None:
    train, test = split_train_test(labelled(), 0.25, seed=0)

    assert (len(train), len(test)) == (30, 10)
    assert (int(train[LABEL].sum()), int(test[LABEL].sum())) == (6, 2)
    assert sorted([*train["row"], *test["row"]]) == list(range(40))


def test_moments_merge_to_the_pooled_mean_and_std() -> None:
    matrix = np.array(
        [[1.0, 10.0, 5.0], [2.0, 20.0, 5.0], [3.0, 35.0, 5.0], [4.0, 40.0, 5.0], [10.0, 55.0, 5.0]],
        dtype=np.float32,
    )
    parts = [Moments.of(matrix[:2]), Moments.of(matrix[2:3]), Moments.of(matrix[3:])]

    mean, std = merge_moments(parts)

    np.testing.assert_allclose(mean, matrix.mean(axis=0))
    np.testing.assert_allclose(std[:2], matrix.std(axis=0)[:2], rtol=1e-6)
    assert std[2] == 1.0  # a constant column is not scaled by zero
    assert sum(p.count for p in parts) == 5


# --- synthetic sites ---------------------------------------------------------------------------

SMALL = SiteProfile(
    rows=300, age_mean=45, income_mean=50_000, urban_share=0.5, online_share=0.4, churn_shift=0.0, drift=True
)


def test_synth_site_is_deterministic_per_seed() -> None:
    site = SITE.model_copy(update={"id": "a"})

    first = synth_site(site, SMALL, seed=11)

    pd.testing.assert_frame_equal(first, synth_site(site, SMALL, seed=11))
    assert not first.equals(synth_site(site, SMALL, seed=12))


@pytest.mark.parametrize("profile", PROFILES, ids=[f"profile{i}" for i in range(len(PROFILES))])
def test_synth_site_has_pii_and_an_imbalanced_label(profile: SiteProfile) -> None:
    frame = synth_site(SITE, profile, seed=5)

    assert len(frame) == profile.rows
    assert {"name", "email", "phone", "customer_id", "gender"} <= set(frame.columns)
    assert frame["customer_id"].is_unique
    assert 0.05 < frame["churned"].mean() < 0.5
    assert set(frame["churned"]) == {0, 1}


def test_drifted_window_is_smaller_and_has_fresh_ids() -> None:
    train = synth_site(SITE, SMALL, seed=1)
    current = synth_site(SITE, SMALL, seed=2, drifted=True)

    assert len(current) == 200  # half the rows, at least 200
    assert not set(train["customer_id"]) & set(current["customer_id"])
    assert current["age"].mean() > train["age"].mean()


def test_not_utf8_message_gives_the_file_offset(tmp_path: Path) -> None:
    # the bad byte sits at file offset 14, but the message says "byte 0"
    content = b"a,b\n1,2\n3,4\n5,\xe9\n"
    path = tmp_path / "train.csv"
    path.write_bytes(content)

    with pytest.raises(SiteDataError) as caught:
        read_table(path, "north")

    offset = content.index(b"\xe9")
    assert f"offset {offset})" in caught.value.message
