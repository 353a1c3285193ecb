"""The `quorum run` progress bar, fed by the tune flow's typed per-round callback (no log parsing)."""

from __future__ import annotations

import dataclasses
import io

import pytest
from rich.console import Console

from quorum.cli.report import RoundProgress
from quorum.flows.tuning import RoundDone


def bar(progress: RoundProgress) -> tuple[float | None, float, str]:
    task = progress.progress.tasks[0]
    return task.total, task.completed, task.fields["detail"]


def test_each_round_moves_the_bar_and_shows_that_rounds_figures() -> None:
    out = io.StringIO()
    progress = RoundProgress(Console(file=out, force_terminal=False, width=100))

    with progress:
        progress(RoundDone(1, 3, 4, 0.61, 0.8, 0.9))
        first = bar(progress)
        progress(RoundDone(2, 3, 3, 0.52, 0.85, 0.925))

    assert first == (3, 1, "accuracy 0.800, AUC 0.900")
    assert bar(progress) == (3, 2, "accuracy 0.850, AUC 0.925")
    assert len(progress.progress.tasks) == 1  # one bar for the job, not one per round
    assert "tuning" in out.getvalue() and "2/3" in out.getvalue()


def test_a_round_no_site_could_score_shows_no_figures() -> None:
    progress = RoundProgress(Console(file=io.StringIO()))

    progress(RoundDone(1, 2, 2, 0.7, None, None))

    assert bar(progress) == (2, 1, "")


def test_a_round_report_cannot_be_changed_by_a_watcher() -> None:
    done = RoundDone(1, 2, 2, 0.7, 0.8, 0.9)

    with pytest.raises(dataclasses.FrozenInstanceError):
        done.server_round = 2  # type: ignore[misc]
