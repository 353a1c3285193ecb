"""Placement in a whole lifecycle: a site outside the policy is never contacted, the guided sampler keeps
its floor, the budget stops training, lineage records it all, and `quorum placement explain` prints
exactly what happened. In-process (sites of different speeds from tests/slow_sites.py), under a
temporary Prefect API, in a temp dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quorum.flows.context import load_context
from quorum.flows.lifecycle import LifecycleResult, run_lifecycle
from quorum.lineage.state import StateLayout
from quorum.tasks.placement import floor_rounds
from tests.federation import POOL_GATES, site_entry, write_federation, write_governance
from tests.slow_sites import SlowSitesRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EU = ("paris", "berlin", "lyon")
DELAY_S = {"paris": 0.01, "berlin": 0.02, "lyon": 3.0, "boston": 0.01}  # added to train_s, never slept
COSTS = {"paris": 1.0, "berlin": 1.0, "lyon": 2.0, "boston": 0.5}
BUDGET = 12.0
ROUNDS = 8
MIN_SHARE = 0.5


@dataclass(frozen=True)
class Job:
    root: Path
    config_path: Path
    runner: SlowSitesRunner
    result: LifecycleResult


def sites() -> dict[str, Any]:
    entries = {}
    for site_id in (*EU, "boston"):
        jurisdiction = "us" if site_id == "boston" else "eu"
        entries[site_id] = {
            **site_entry(site_id),
            "tags": {"jurisdiction": jurisdiction, "data_class": "clinical"},
            "cost_per_round": COSTS[site_id],
        }
    return entries


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, prefect_harness: Path) -> Job:
    root = tmp_path_factory.mktemp("placement")
    config_path = write_federation(
        root,
        (*EU, "boston"),
        rounds=ROUNDS,
        min_sites=1,
        gates={**POOL_GATES, "min_accuracy": 0.0, "min_auc": 0.0, "min_site_accuracy": 0.0},
        training={"sample_fraction": 0.6},
        extra={
            "sites": sites(),
            "placement": {
                "require": {"jurisdiction": "eu", "data_class": "clinical"},
                "sampler": "guided",
                "min_share": MIN_SHARE,
                "budget": BUDGET,
            },
        },
    )
    governance, keys = write_governance(root)
    ctx = load_context(str(config_path), str(governance), "placed-job")
    runner = SlowSitesRunner(ctx.config, DELAY_S, sleep=False)
    result = run_lifecycle(ctx, runner, keys[:2])
    return Job(root, config_path, runner, result)


def test_a_site_outside_the_policy_is_never_contacted(job: Job) -> None:
    kinds = {kind for kind, _ in job.runner.calls}

    assert {"start", "preprocess", "train", "evaluate", "monitor"} <= kinds  # every stage ran
    assert job.runner.contacted() == set(EU)
    assert not (job.root / "sites" / "boston" / "processed").exists()  # it never even preprocessed
    assert job.result.placement.left_out == {"boston": "tag jurisdiction is us (required: eu)"}


def test_the_budget_stops_training_and_the_spend_is_reported(job: Job) -> None:
    tuning = job.result.tuning
    assert tuning is not None and tuning.placement is not None

    asked = [sites for kind, sites in job.runner.calls if kind == "train"]
    spent = sum(COSTS[s] for sites in asked for s in sites)

    assert tuning.stopped_early.startswith("placement budget: round")
    assert len(tuning.rounds) < ROUNDS and len(asked) == len(tuning.rounds)
    assert tuning.placement.spent == spent <= BUDGET
    assert job.result.promotion is not None  # the job went on to evaluate and register the last model


def test_the_guided_sampler_keeps_the_slow_site_at_its_floor_and_prefers_fast_ones(job: Job) -> None:
    tuning = job.result.tuning
    assert tuning is not None and tuning.placement is not None
    asked = [sites for kind, sites in job.runner.calls if kind == "train"]

    for done in range(1, len(asked) + 1):
        for site_id in EU:
            assert sum(site_id in sites for sites in asked[:done]) >= floor_rounds(MIN_SHARE, done)
    assert sum("lyon" in s for s in asked) < sum("paris" in s for s in asked)


def test_lineage_names_the_chosen_sites_and_why_the_others_were_left_out(job: Job) -> None:
    from mlflow import MlflowClient

    config = load_context(str(job.config_path), str(job.root / "governance.yaml")).config
    state = StateLayout(config.state_dir)
    client = MlflowClient(tracking_uri=state.tracking_uri, registry_uri=state.tracking_uri)
    promotion = job.result.promotion
    assert promotion is not None

    parent = client.get_run(job.result.run_id)
    version = client.get_model_version(config.model_name, promotion.version)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{job.result.run_id}'")
    tune = next(r for r in children if r.info.run_name == "tune")

    assert parent.data.params["placement.eligible"] == "paris,berlin,lyon"
    assert parent.data.params["placement.sampler"] == "guided"
    assert parent.data.tags["placement.left_out.boston"] == "tag jurisdiction is us (required: eu)"
    assert version.tags["placement.sites"] == "paris,berlin,lyon"
    assert version.tags["placement.left_out.boston"] == "tag jurisdiction is us (required: eu)"
    assert float(version.tags["placement.spent"]) == job.result.tuning.placement.spent  # type: ignore[union-attr]
    assert tune.data.tags["placement.budget_exhausted"] == "true"
    assert float(tune.data.metrics["placement.spent"]) == job.result.tuning.placement.spent  # type: ignore[union-attr]


def test_explain_prints_what_happened_round_by_round(job: Job, capsys: pytest.CaptureFixture[str]) -> None:
    from quorum.cli.main import main

    code = main(["placement", "explain", "placed-job", "--config", str(job.config_path)])
    lines = capsys.readouterr().out.splitlines()
    tuning = job.result.tuning
    assert code == 0 and tuning is not None
    asked = [sites for kind, sites in job.runner.calls if kind == "train"]

    heads = [i for i, line in enumerate(lines) if line.startswith("round ")]
    assert len(heads) == len(asked) + 1  # every round that ran, then the one the budget stopped
    for server_round, (start, sites, record) in enumerate(zip(heads, asked, tuning.rounds, strict=False), start=1):
        head, block = lines[start], lines[start + 1 : start + 1 + len(EU)]
        assert head.startswith(f"round {server_round} (guided): asked {', '.join(sorted(sites))}; ")
        assert f"answered {', '.join(record.sites)};" in head
        for line in block:  # one line per eligible site: asked or not, as the runner saw it
            site_id = line.split()[0]
            assert line.split()[1] == ("asked:" if site_id in sites else "not")
            if site_id in sites:  # its measured time: the training plus the harness's delay
                assert float(line.split("answered in ")[1].split(" s")[0]) >= DELAY_S[site_id]
    assert lines[heads[-1]].startswith(f"round {len(asked) + 1}: not run: placement budget")
    assert any("boston" in line and "left out of the job: it tag jurisdiction is us" in line for line in lines)
    assert all("boston" not in line for line in lines[heads[0] :])  # never a candidate in any round


def test_explain_of_an_unknown_job_says_which_jobs_exist(job: Job, capsys: pytest.CaptureFixture[str]) -> None:
    from quorum.cli.main import main

    code = main(["placement", "explain", "no-such-job", "--config", str(job.config_path)])
    err = capsys.readouterr().err

    assert code == 1
    assert "error:" in err and "no placement record of job no-such-job" in err
    assert "fix:" in err and "placed-job" in err
