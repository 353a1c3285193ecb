"""Site worker processes: the embedded runner's sites work in them with the same results, a site's
expected failure stays its own, a worker that dies fails only its sites, and a worker imports site
code only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quorum.configs.schema import load_federation
from quorum.flows.runners.site_workers import SiteFailure, SiteWorkers, start_site_workers, worker_count
from quorum.tasks import site as site_work
from tests import site_worker_probes as probes
from tests.federation import write_federation

SITES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def workers() -> Iterator[SiteWorkers]:
    with SiteWorkers(2) as started:
        yield started


def test_no_processes_means_work_stays_here() -> None:
    assert start_site_workers(0) is None


@pytest.mark.parametrize(
    ("setting", "cores", "load_1m", "expected"),
    [
        (3, 2, 9.0, 3),  # a number is taken as it is, whatever the load
        (0, 8, 0.0, 0),
        ("auto", 4, 0.3, 4),  # idle: one per core
        ("auto", 16, 0.5, 4),  # capped
        ("auto", 8, 4.0, 0),  # half the cores busy: the job's own process does the work
        ("auto", 2, 0.0, 0),  # two cores are filled by the job's own start-up
    ],
)
def test_how_many_workers_a_setting_starts(setting: int | str, cores: int, load_1m: float, expected: int) -> None:
    assert worker_count(setting, cores, load_1m) == expected  # type: ignore[arg-type]


@pytest.mark.integration  # starts worker processes that load torch and Great Expectations
def test_each_site_gets_its_own_result_and_its_own_failure(workers: SiteWorkers) -> None:
    echoed = workers.run_each(probes.echo, SITES, lambda site_id: (site_id,))
    refused = workers.run_one(probes.refuse, "beta", "beta")

    assert {site_id: result[0] for site_id, result in echoed.items() if isinstance(result, tuple)} == {
        site_id: site_id for site_id in SITES
    }
    assert isinstance(refused, SiteFailure)
    assert (refused.site_id, refused.message, refused.fix) == ("beta", "site beta: no rows", "add rows")


@pytest.mark.integration  # starts worker processes that load torch and Great Expectations
def test_a_dead_worker_fails_its_site_and_the_next_call_has_workers_again(workers: SiteWorkers) -> None:
    died = workers.run_one(probes.die, "gamma", "gamma")
    after = workers.run_each(probes.echo, SITES, lambda site_id: (site_id,))

    assert isinstance(died, SiteFailure) and died.headline == "Site worker died"
    assert "site_processes: 0" in died.fix
    assert not any(isinstance(result, SiteFailure) for result in after.values())


@pytest.mark.integration  # starts worker processes that load torch and Great Expectations
def test_rested_workers_hold_no_process_and_start_again_on_the_next_call(workers: SiteWorkers) -> None:
    before = {result[1] for result in workers.run_each(probes.echo, SITES, lambda s: (s,)).values()}  # type: ignore[index]
    workers.rest()
    after = workers.run_each(probes.echo, SITES, lambda site_id: (site_id,))

    assert not any(isinstance(result, SiteFailure) for result in after.values())
    assert before.isdisjoint(result[1] for result in after.values())  # type: ignore[index]


@pytest.mark.integration  # starts worker processes that load torch and Great Expectations
def test_a_worker_loads_site_code_but_no_orchestrator_or_tracker(workers: SiteWorkers) -> None:
    loaded = workers.run_one(probes.loaded_frameworks, "alpha", "alpha")

    assert loaded == {"prefect": False, "mlflow": False, "great_expectations": True, "torch": True}


@pytest.mark.integration  # starts worker processes that load torch and Great Expectations
def test_sites_work_in_workers_with_the_results_they_have_here(tmp_path: Path, workers: SiteWorkers) -> None:
    from quorum.flows.tuning import start_weights

    (tmp_path / "fed").mkdir()
    config = load_federation(write_federation(tmp_path / "fed", SITES))
    here = {site_id: site_work.preprocess_site(config, site_id) for site_id in SITES}
    there = workers.run_each(site_work.preprocess_site, SITES, lambda site_id: (config, site_id))
    weights, _ = start_weights(config, here)
    trained_here = {site_id: site_work.train_site(config, site_id, weights, 1) for site_id in SITES}
    trained_there = workers.run_each(site_work.train_site, SITES, lambda site_id: (config, site_id, weights, 1))

    assert {s: fp.data_hash for s, fp in there.items() if not isinstance(fp, SiteFailure)} == {
        s: fp.data_hash for s, fp in here.items()
    }
    for site_id in SITES:
        theirs = trained_there[site_id]
        assert not isinstance(theirs, SiteFailure)
        for mine, its in zip(trained_here[site_id].weights, theirs.weights, strict=True):
            np.testing.assert_array_equal(mine, its)
