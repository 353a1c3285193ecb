"""The data contract adapter: right verdicts, and nothing from the data leaks into the summary."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from quorum.configs.errors import ReplyRejected, SiteDataError, ToolError
from quorum.configs.schema import ContractConfig, FeatureConfig, SiteConfig
from quorum.tasks import contract as contract_module
from quorum.tasks.contract import ContractSummary, FailedExpectation, build_suite_spec, validate_contract
from quorum.tasks.wire import decode_contract, encode_contract

ROWS = 10
FEATURES = FeatureConfig(numeric=("age", "income"), categorical={"region": ("north", "south")})
CONTRACT = ContractConfig(
    min_rows=8,
    max_rows=1000,
    max_null_fraction=0.2,
    numeric_ranges={"age": (0.0, 120.0)},
    label_rate=(0.2, 0.8),
)
SITE = SiteConfig(
    id="alpha",
    root=Path("/nonexistent/alpha"),
    target="label",
    id_column="record_id",
    pii_columns=("email",),
    protected_attribute="sex",
)
CANARY_TEXT = "CANARY-7f3a9"
CANARY_NUMBER = 987654.321


def clean_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "record_id": list(range(1, ROWS + 1)),
            "age": [23, 35, 47, 51, 62, 29, 40, 33, 58, 44],
            "income": [31.5, 42.0, 55.25, 61.0, 38.75, 47.5, 52.0, 36.0, 70.5, 44.25],
            "region": ["north", "south"] * (ROWS // 2),
            "sex": ["f", "m"] * (ROWS // 2),
            "label": [0, 1] * (ROWS // 2),
            "email": [f"person{i}@example.org" for i in range(ROWS)],
            "notes": ["called back", "no answer", "ok", "", "follow up", "ok", "ok", "late", "ok", "done"],
        }
    )


def check(frame: pd.DataFrame, report_dir: Path | None = None) -> ContractSummary:
    return validate_contract(frame, FEATURES, CONTRACT, SITE, report_dir=report_dir)


def with_values(column: str, values: dict[int, object]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(object)
        for row, value in values.items():
            frame.at[row, column] = value
        return frame.infer_objects()

    return change


BAD_FRAMES = {
    "missing column": (lambda f: f.drop(columns=["income"]), "expect_column_to_exist", "income"),
    "too many nulls": (with_values("income", dict.fromkeys(range(5))), "expect_column_values_to_not_be_null", "income"),
    "out of range": (with_values("age", {0: 200}), "expect_column_values_to_be_between", "age"),
    "not a number": (with_values("age", {0: "old"}), "expect_column_values_to_be_in_type_list", "age"),
    "unknown category": (with_values("region", {0: "west"}), "expect_column_values_to_be_in_set", "region"),
    "label not 0/1": (with_values("label", {0: 2}), "expect_column_values_to_be_in_set", "label"),
    "label missing": (with_values("label", {0: None}), "expect_column_values_to_not_be_null", "label"),
    "label rate": (lambda f: f.assign(label=1), "expect_column_mean_to_be_between", "label"),
    "duplicate ids": (with_values("record_id", {1: 1}), "expect_column_values_to_be_unique", "record_id"),
    "too few rows": (lambda f: f.head(3), "expect_table_row_count_to_be_between", None),
    "no protected attribute": (lambda f: f.drop(columns=["sex"]), "expect_column_to_exist", "sex"),
}


def test_clean_frame_passes() -> None:
    summary = check(clean_frame())

    assert summary.passed, summary.describe()
    assert summary.failed == ()
    assert summary.warnings == ()
    assert summary.evaluated == len(build_suite_spec(FEATURES, CONTRACT, SITE))


@pytest.mark.parametrize("label_values", [[0, 1], [0.0, 1.0], [False, True]], ids=["int", "float", "bool"])
def test_labels_may_be_ints_floats_or_bools(label_values: list[object]) -> None:
    frame = clean_frame().assign(label=label_values * (ROWS // 2))

    assert check(frame).passed


def test_nullable_pandas_dtypes_count_as_numeric() -> None:
    frame = clean_frame().astype({"age": "Int64", "income": "Float64"})

    assert check(frame).passed


@pytest.mark.parametrize(("change", "expectation", "column"), list(BAD_FRAMES.values()), ids=list(BAD_FRAMES))
def test_bad_frame_fails_the_right_expectation(
    change: Callable[[pd.DataFrame], pd.DataFrame], expectation: str, column: str | None
) -> None:
    summary = check(change(clean_frame()))

    assert not summary.passed
    assert (expectation, column) in {(item.expectation, item.column) for item in summary.failed}, summary.describe()
    assert summary.describe().count("\n") == len(summary.failed) - 1


def test_missing_column_is_named_missing_by_every_rule_on_it() -> None:
    summary = check(clean_frame().drop(columns=["income"]))

    on_income = [item for item in summary.failed if item.column == "income"]
    assert {item.expectation for item in on_income} >= {
        "expect_column_to_exist",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_in_type_list",
    }
    assert all(item.detail == "column 'income' is missing" for item in on_income)
    assert all(item.unexpected_count is None for item in on_income)
    assert {item.column for item in summary.failed} == {"income"}


def test_failure_details_carry_counts_and_bounds() -> None:
    summary = check(with_values("age", {0: 200, 1: -1})(clean_frame()))

    (failure,) = summary.failed
    assert failure.unexpected_count == 2
    assert failure.detail == "2 values fall outside [0, 120]"


def test_summary_never_quotes_data_values() -> None:
    frame = clean_frame()
    frame = with_values("region", {0: CANARY_TEXT, 1: CANARY_TEXT})(frame)
    frame = with_values("income", {2: CANARY_NUMBER})(frame)
    frame = with_values("age", {3: CANARY_NUMBER})(frame)
    frame = with_values("label", {4: CANARY_TEXT})(frame)  # GE's own error text would quote this one

    summary = check(frame)

    shared = json.dumps(encode_contract(summary)) + summary.describe()
    assert not summary.passed
    assert {"region", "age", "label"} <= {item.column for item in summary.failed}
    for canary in (CANARY_TEXT, "987654", "9.87654e+05", "9.876"):
        assert canary not in shared


def test_undeclared_email_column_warns_without_values() -> None:
    frame = clean_frame().assign(contact=[f"reach me at user{i}@mail.example.com" for i in range(ROWS)])

    summary = check(frame)

    assert summary.passed
    assert summary.warnings == (
        "column 'contact' looks like it holds email addresses but is not listed in pii_columns",
    )
    assert "mail.example.com" not in json.dumps(encode_contract(summary))


@pytest.mark.parametrize(
    ("values", "warned"),
    [
        (["+44 20 7946 0958", "(555) 123-4567", "555.987.6543", "n/a", "n/a"] * 2, True),
        (["2024-01-15", "1234.5678", "ok", "12", "order 55512"] * 2, False),
    ],
    ids=["phones", "dates-and-decimals"],
)
def test_phone_numbers_are_flagged_but_dates_are_not(values: list[str], warned: bool) -> None:
    warnings = check(clean_frame().assign(free_text=values)).warnings

    assert bool(warnings) is warned
    assert all("phone numbers" in text and "free_text" in text for text in warnings)


def test_declared_pii_column_does_not_warn() -> None:
    assert check(clean_frame()).warnings == ()  # 'email' holds addresses but is declared


def test_summary_round_trips_through_json() -> None:
    summary = ContractSummary(
        passed=False,
        evaluated=7,
        failed=(
            FailedExpectation("expect_column_to_exist", "income", None, "column 'income' is missing"),
            FailedExpectation("expect_table_row_count_to_be_between", None, None, "3 rows, the contract needs 8 to 9"),
            FailedExpectation("expect_column_values_to_be_unique", "record_id", 2, "2 rows share their id"),
        ),
        warnings=("column 'notes' looks like it holds phone numbers but is not listed in pii_columns",),
    )

    assert decode_contract(json.loads(json.dumps(encode_contract(summary)))) == summary


@pytest.mark.parametrize(
    "data",
    [{}, {"passed": "yes", "evaluated": 1, "failed": [], "warnings": []}, {"passed": True, "evaluated": 1}],
)
def test_from_dict_rejects_other_shapes(data: dict[str, object]) -> None:
    with pytest.raises(ReplyRejected, match="malformed contract summary"):
        decode_contract(data)


def test_full_report_is_written_to_report_dir(tmp_path: Path) -> None:
    report_dir = tmp_path / "reports" / "contract"

    summary = check(with_values("region", {0: CANARY_TEXT})(clean_frame()), report_dir=report_dir)

    report = json.loads((report_dir / "contract_result.json").read_text(encoding="utf-8"))
    assert report["success"] is False
    assert len(report["results"]) == summary.evaluated
    assert CANARY_TEXT in json.dumps(report)  # the site-local report keeps the detail the summary drops
    assert [path.name for path in report_dir.iterdir()] == ["contract_result.json"]


def test_duplicate_column_names_are_refused() -> None:
    frame = pd.concat([clean_frame(), clean_frame()[["age"]]], axis=1)

    with pytest.raises(SiteDataError, match="'age'"):
        check(frame)


@pytest.fixture
def fresh_context() -> Iterator[None]:
    """Forget the process's GE context before and after the test, so it is built (or broken) anew."""
    contract_module._context.cache_clear()
    yield
    contract_module._context.cache_clear()


def test_great_expectations_crash_is_a_tool_error_that_quotes_no_data(
    monkeypatch: pytest.MonkeyPatch, fresh_context: None
) -> None:
    def broken_context(**_: object) -> None:
        raise RuntimeError(f"cannot parse value {CANARY_TEXT}")

    pytest.importorskip("great_expectations")
    monkeypatch.setattr("great_expectations.get_context", broken_context)

    with pytest.raises(ToolError) as caught:
        check(clean_frame())

    assert "'alpha'" in caught.value.message and "RuntimeError" in caught.value.message
    assert CANARY_TEXT not in caught.value.render()
    assert caught.value.fix


def test_one_ge_context_serves_every_check_in_a_process(monkeypatch: pytest.MonkeyPatch, fresh_context: None) -> None:
    gx = pytest.importorskip("great_expectations")
    built: list[object] = []
    real = gx.get_context

    def counting_context(**kwargs: object) -> object:
        built.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr("great_expectations.get_context", counting_context)
    bad = clean_frame().assign(age=[-5.0, *clean_frame()["age"][1:]])

    first, second, third = check(clean_frame()), check(bad), check(clean_frame())

    assert built == [{"mode": "ephemeral"}]  # in memory: no stores written anywhere
    assert first == third and first.passed and not second.passed  # a shared context keeps checks apart
    assert [(f.column, f.unexpected_count) for f in second.failed] == [("age", 1)]


def test_sites_checked_side_by_side_get_the_results_of_checks_in_turn() -> None:
    from concurrent.futures import ThreadPoolExecutor

    frames = [clean_frame(), clean_frame().assign(label=[1] * ROWS), clean_frame().drop(columns="income")] * 2
    in_turn = [check(frame) for frame in frames]

    with ThreadPoolExecutor(max_workers=len(frames)) as pool:  # how the LocalRunner preprocesses its sites
        side_by_side = list(pool.map(check, frames))

    assert side_by_side == in_turn
    assert [summary.passed for summary in in_turn] == [True, False, False] * 2


def test_a_repeated_rule_is_checked_once() -> None:
    gx = pytest.importorskip("great_expectations")
    spec = build_suite_spec(FEATURES, CONTRACT, SITE)

    suite = contract_module._suite(gx, [*spec, spec[1]], "repeated")

    assert len(suite.expectations) == len(spec)


def test_suite_spec_is_plain_data_and_covers_every_column() -> None:
    spec = build_suite_spec(FEATURES, CONTRACT, SITE)

    assert json.loads(json.dumps(spec)) == spec
    exists = {item["kwargs"]["column"] for item in spec if item["type"] == "expect_column_to_exist"}
    assert exists == {"age", "income", "region", "label", "record_id", "sex"}
    null_rules = [item for item in spec if item["type"] == "expect_column_values_to_not_be_null"]
    assert {item["kwargs"]["column"]: item["kwargs"]["mostly"] for item in null_rules} == {
        "age": 0.8,
        "income": 0.8,
        "region": 0.8,
        "label": 1.0,
    }
    between = [item["kwargs"] for item in spec if item["type"] == "expect_column_values_to_be_between"]
    assert between == [{"column": "age", "min_value": 0.0, "max_value": 120.0}]


def test_importing_the_module_does_not_import_great_expectations() -> None:
    code = "import sys, quorum.tasks.contract; sys.exit('great_expectations' in sys.modules)"
    root = Path(__file__).resolve().parents[1]

    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
