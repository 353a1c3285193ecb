"""A coordinator that dies between rounds resumes from its last checkpoint without recomputing a round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from quorum.flows.runners.local import LocalRunner
from tests.federation import write_federation, write_governance


class CoordinatorKilled(Exception):
    pass


class DyingRunner(LocalRunner):
    """Counts the training rounds it dispatches and dies when asked for round ``die_at``."""

    def __init__(self, config: Any, die_at: int | None) -> None:
        super().__init__(config)
        self.die_at = die_at
        self.trained: list[int] = []

    def train(self, site_ids: Sequence[str], weights: Any, server_round: int, *args: Any) -> dict[str, Any]:
        if server_round == self.die_at:
            raise CoordinatorKilled(f"killed before round {server_round}")
        self.trained.append(server_round)
        return super().train(site_ids, weights, server_round, *args)


def test_resume_continues_after_the_last_completed_round(tmp_path: Path, prefect_harness: Path) -> None:
    from quorum.flows.context import load_context
    from quorum.flows.lifecycle import run_lifecycle

    config_path = write_federation(tmp_path, ("alpha", "beta"), rounds=4, min_sites=2)
    governance_path, keys = write_governance(tmp_path)
    first = load_context(str(config_path), str(governance_path), "job-resume")
    dying = DyingRunner(first.config, die_at=3)
    with pytest.raises(CoordinatorKilled):
        run_lifecycle(first, dying, keys[:2])
    rounds = first.store.checkout("jobs/job-resume/rounds")
    stamps = {p.name: p.stat().st_mtime_ns for p in rounds.glob("*/global.npz")}

    again = load_context(str(config_path), str(governance_path), "job-resume")
    survivor = DyingRunner(again.config, die_at=None)
    result = run_lifecycle(again, survivor, keys[:2], resume=True)

    assert dying.trained == [1, 2]
    assert survivor.trained == [3, 4]
    assert [r.server_round for r in result.tuning.rounds] == [1, 2, 3, 4]
    assert {p.name: p.stat().st_mtime_ns for p in rounds.glob("000[12]/global.npz")} == stamps
    assert result.run_id and result.stage_status["preprocess"] == "resumed"
    assert result.promotion is not None and result.promotion.champion


def test_resume_of_an_unknown_job_is_a_clear_error(
    tmp_path: Path, prefect_harness: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from quorum.cli.main import main

    config_path = write_federation(tmp_path, ("alpha", "beta"), rounds=1, min_sites=2)
    governance_path, _ = write_governance(tmp_path)

    code = main(["run", "--config", str(config_path), "--governance", str(governance_path), "--resume", "nope"])

    err = capsys.readouterr().err
    assert code != 0
    assert "job nope has no record" in err and "fix:" in err and "Traceback" not in err
