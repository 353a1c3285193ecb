"""The LocalRunner's fan-out: one Prefect task run per step that visits the sites in turn on one torch thread,
and a site's expected failure kept to that site."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prefect import flow
from prefect.runtime import task_run

from quorum.configs.errors import SiteDataError
from quorum.configs.schema import FederationConfig
from quorum.flows.runners.local import LocalRunner, SiteFailure
from quorum.tasks import site as site_work

pytestmark = pytest.mark.usefixtures("prefect_harness")

SITES = ("alpha", "beta", "gamma")
WEIGHTS = [np.zeros((2, 2), dtype=np.float32)]


@dataclass(frozen=True)
class Visit:
    site_id: str
    task_run: str
    torch_threads: int


@pytest.fixture
def visits(monkeypatch: pytest.MonkeyPatch) -> list[Visit]:
    """Site training and evaluation record where they ran and answer with a label; beta's data is gone."""
    seen: list[Visit] = []

    def recording(step: str) -> Callable[..., str]:
        def work(config: FederationConfig, site_id: str, *args: Any) -> str:
            seen.append(Visit(site_id, task_run.name, torch.get_num_threads()))
            if site_id == "beta":
                raise SiteDataError("beta's disk is gone", fix="replace it")
            return f"{step} at {site_id}"

        return work

    monkeypatch.setattr(site_work, "train_site", recording("trained"))
    monkeypatch.setattr(site_work, "evaluate_site", recording("evaluated"))
    return seen


@pytest.fixture
def three_torch_threads() -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def config(tmp_path: Path) -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "local",
            "model_name": "local-model",
            "features": {"numeric": ["x0", "x1"]},
            "sites": {s: {"root": str(tmp_path / s)} for s in SITES},
            "model": {"hidden_sizes": [2]},
        }
    )


@pytest.mark.parametrize(
    ("step", "label", "task_run_name"),
    [
        (lambda runner: runner.train(SITES, WEIGHTS, 7), "trained", "train-round-7"),
        (lambda runner: runner.evaluate(SITES, WEIGHTS), "evaluated", "evaluate_at_sites-"),
    ],
    ids=["train", "evaluate"],
)
def test_a_step_is_one_task_run_visiting_every_site_in_turn_and_keeps_a_failure_to_its_site(
    tmp_path: Path,
    visits: list[Visit],
    three_torch_threads: int,
    step: Callable[[LocalRunner], dict[str, Any]],
    label: str,
    task_run_name: str,
) -> None:
    runner = LocalRunner(config(tmp_path))

    @flow(validate_parameters=False)
    def job() -> dict[str, Any]:
        return step(runner)

    replies = job()

    assert [v.site_id for v in visits] == list(SITES)
    assert len({v.task_run for v in visits}) == 1 and visits[0].task_run.startswith(task_run_name)
    assert {v.torch_threads for v in visits} == {1}
    assert torch.get_num_threads() == three_torch_threads  # the process gets its own count back
    assert replies["alpha"] == f"{label} at alpha" and replies["gamma"] == f"{label} at gamma"
    failure = replies["beta"]
    assert isinstance(failure, SiteFailure) and failure.site_id == "beta" and "disk is gone" in failure.message


def test_an_unexpected_error_at_a_site_fails_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, three_torch_threads: int
) -> None:
    def broken(config: FederationConfig, site_id: str, *args: Any) -> None:
        raise RuntimeError(f"bug at {site_id}")  # a bug, not a site's data: the job must not go on quietly

    monkeypatch.setattr(site_work, "train_site", broken)
    runner = LocalRunner(config(tmp_path))

    @flow(validate_parameters=False)
    def job() -> dict[str, Any]:
        return runner.train(SITES, WEIGHTS, 1)

    with pytest.raises(RuntimeError, match="bug at alpha"):
        job()
    assert torch.get_num_threads() == three_torch_threads
