"""Each test lands in exactly one tier: a hand-written marker wins, else what its fixtures start."""

from __future__ import annotations

import pytest

from tests.conftest import tier


@pytest.mark.parametrize(
    ("marked", "fixtures", "expected"),
    [
        (set(), {"tmp_path"}, "unit"),  # nothing started: in-process
        (set(), {"prefect_harness", "tmp_path"}, "flow"),  # a Prefect API for flow runs
        (set(), {"s3_endpoint", "prefect_harness"}, "integration"),  # a real S3 server outranks the API
        ({"integration", "parametrize"}, {"prefect_harness"}, "integration"),  # marked by hand: starts the CLI
        ({"unit"}, {"bucket"}, "unit"),  # an explicit marker is taken as written
    ],
    ids=["plain", "harness", "server-fixture", "hand-marked", "explicit-wins"],
)
def test_a_test_gets_one_tier(marked: set[str], fixtures: set[str], expected: str) -> None:
    assert tier(marked, fixtures) == expected


def test_two_tier_markers_on_one_test_are_refused() -> None:
    with pytest.raises(pytest.UsageError, match="more than one tier marker: unit, integration"):
        tier({"unit", "integration"}, set())


def test_this_module_is_in_the_unit_tier(request: pytest.FixtureRequest) -> None:
    tiers = [m.name for m in request.node.iter_markers() if m.name in ("unit", "flow", "integration")]

    assert tiers == ["unit"]


def test_slow_files_go_first_and_one_file_starts_each_shared_build() -> None:
    from tests.conftest import run_order

    files = [
        ("test_a_unit.py", {"tmp_path"}),
        ("test_b_flow.py", {"prefect_harness"}),
        ("test_c_governed.py", {"governed_history", "prefect_harness"}),
        ("test_d_unit.py", set()),
        ("test_e_governed.py", {"governed_history", "prefect_harness"}),
        ("test_f_flow.py", {"prefect_harness", "tmp_path"}),
    ]

    assert run_order(files) == [
        "test_c_governed.py",  # starts building the shared history while the other process runs flow files
        "test_b_flow.py",
        "test_f_flow.py",
        "test_e_governed.py",  # after the flow tier: the history is built by then
        "test_a_unit.py",
        "test_d_unit.py",
    ]
