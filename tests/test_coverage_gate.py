"""The coverage gate: a candidate speaks for the federation only if enough of its sites trained it."""

from __future__ import annotations

from pathlib import Path

import pytest

from quorum.configs.schema import GatePolicy
from quorum.evaluation.gates import Coverage, decide
from quorum.evaluation.metrics import BinaryCounts
from quorum.evaluation.report import EvaluationReport, SiteEvaluation
from quorum.flows.evaluate import site_coverage

EIGHT = tuple(f"s{i}" for i in range(1, 9))
# only the gates that do not depend on model quality, so the coverage gate alone decides
QUALITY_OFF = GatePolicy(
    min_accuracy=None,
    min_auc=None,
    min_site_accuracy=None,
    max_regression=None,
    max_selection_rate_gap=None,
)


def _report(sites: tuple[str, ...]) -> EvaluationReport:
    counts = BinaryCounts(tp=40, fp=5, tn=50, fn=5)
    return EvaluationReport(
        sites=tuple(SiteEvaluation(s, counts, {}) for s in sites), contracts_passed={s: True for s in sites}
    )


def _absent(sites: tuple[str, ...]) -> dict[str, str]:
    return {s: "did not answer: its pool has no live worker (absent)" for s in sites}


def test_a_candidate_from_two_of_eight_sites_fails_on_the_default_fraction() -> None:
    coverage = Coverage.of(EIGHT, _absent(EIGHT[2:]))

    verdict = decide(_report(EIGHT), None, QUALITY_OFF.model_copy(update={"min_site_fraction": 0.75}), coverage)

    [gate] = [g for g in verdict.gates if g.name == "site_coverage"]
    assert GatePolicy().min_site_fraction == 0.75
    assert not verdict.passed and not gate.passed
    assert (gate.value, gate.bound) == (0.25, 0.75)
    assert "2 of 8 configured sites trained the candidate (not s3, s4, s5, s6, s7, s8)" in gate.reason
    assert [site for site, _ in verdict.excluded] == list(EIGHT[2:])


def test_the_verdict_lists_every_excluded_site_with_its_reason() -> None:
    coverage = Coverage.of(EIGHT, {"s2": "update rejected: 3 tensors, expected 4", **_absent(("s7",))})

    verdict = decide(_report(EIGHT), None, QUALITY_OFF, coverage)

    assert verdict.passed  # 6 of 8 meets 0.75
    assert verdict.to_dict()["excluded_sites"] == {
        "s2": "update rejected: 3 tensors, expected 4",
        "s7": "did not answer: its pool has no live worker (absent)",
    }
    assert verdict.tags()["excluded.s7"] == "did not answer: its pool has no live worker (absent)"
    assert verdict.tags()["gate.site_coverage"] == "pass 0.7500 >= 0.7500"
    assert "s2: update rejected" in verdict.to_markdown()


@pytest.mark.parametrize(
    ("trained", "fraction", "passed"),
    [
        (8, 1.0, True),  # everyone
        (6, 0.75, True),  # exactly the share
        (5, 0.75, False),  # one short
        (1, 0.0, True),  # the gate switched off by a zero share
    ],
)
def test_the_share_is_compared_with_min_site_fraction(trained: int, fraction: float, passed: bool) -> None:
    coverage = Coverage.of(EIGHT, _absent(EIGHT[trained:]))

    verdict = decide(
        _report(EIGHT[:trained]), None, QUALITY_OFF.model_copy(update={"min_site_fraction": fraction}), coverage
    )

    assert verdict.passed is passed


def test_without_coverage_there_is_no_coverage_gate() -> None:
    verdict = decide(_report(EIGHT[:2]), None, QUALITY_OFF)

    assert "site_coverage" not in [g.name for g in verdict.gates] and verdict.excluded == ()


def test_site_coverage_names_each_site_that_never_trained_with_its_newest_reason() -> None:
    rounds = [
        (("s1", "s2"), {"s3": "reply is for round 2, expected 1"}),  # s4 not asked this round
        (("s1", "s3"), {"s2": "tensor 0 holds NaN or Inf"}),  # s3 trained after all
    ]

    coverage = site_coverage(("s1", "s2", "s3", "s4", "s5"), {"s5": "s5: data contract failed: age"}, rounds)

    assert coverage.trained == ("s1", "s2", "s3")
    assert dict(coverage.excluded) == {"s4": "asked in no round", "s5": "data contract failed: age"}


def test_too_few_answering_sites_stop_the_job_naming_each_reason_and_fix(tmp_path: Path) -> None:
    from quorum.configs.errors import NotEnoughSites
    from quorum.configs.schema import load_federation
    from quorum.flows.preprocess import select_sites
    from quorum.flows.runners.site_workers import SiteFailure
    from tests.federation import write_federation

    config = load_federation(write_federation(tmp_path, ("alpha", "beta"), min_sites=2))
    silent = SiteFailure("beta", "Site did not answer", "site beta did not answer: its session crashed", "start it")

    with pytest.raises(NotEnoughSites) as stopped:
        select_sites(config, {"beta": silent})

    assert "site beta did not answer: its session crashed (fix: start it)" in stopped.value.message
    assert "follow each site's fix above, or lower training.min_sites" in stopped.value.fix
