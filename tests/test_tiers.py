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
