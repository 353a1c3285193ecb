"""Site worker processes: where the embedded runner does the sites' work when it may use every core.

The coordinator process spends most of a job's first seconds importing Prefect and MLflow and waiting
for its temporary Prefect API, with one core to spare, and then mostly waits while the sites work. The
sites' own code needs other heavy imports (Great Expectations for the contract, torch for training).
``SiteWorkers`` starts a few plain Python processes as soon as ``quorum run`` has read its config: they
import the site code while the coordinator starts up, and then run the sites' preprocessing, training,
evaluation and monitoring side by side on the machine's cores. Each call still works on one site's
own folder, exactly as in the coordinator process, with the same seeds, so the results are the same.

This module and what a worker imports are site code only: no Prefect, no MLflow. Everything that
crosses the process boundary is plain data (the config, weights, results, ``SiteFailure``).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from quorum.configs.errors import QuorumError

T = TypeVar("T")


@dataclass(frozen=True)
class SiteFailure:
    """An expected failure at one site (bad data, missing file): the site is left out, the job decides."""

    site_id: str
    headline: str
    message: str
    fix: str

    @classmethod
    def of(cls, site_id: str, error: QuorumError) -> SiteFailure:
        return cls(site_id, error.headline, error.message, error.fix)

    def describe(self) -> str:
        return f"{self.site_id}: {self.message}" + (f" (fix: {self.fix})" if self.fix else "")


def guarded(work: Callable[..., T], site_id: str, *args: Any) -> T | SiteFailure:
    """``work(*args)``, with the site's expected failure returned as its result instead of raised."""
    try:
        return work(*args)
    except QuorumError as error:
        return SiteFailure.of(site_id, error)


def _warm_up() -> None:
    """Runs once in each worker: pay the site code's imports now, while the coordinator starts up."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import torch

    from quorum.tasks import contract, site  # noqa: F401 - loaded for its import cost

    torch.set_num_threads(1)  # one process per core: a thread pool per process would oversubscribe them
    contract.warm_up()


class SiteWorkers:
    """A few site worker processes shared by every site; each call sends one site's work to one of them."""

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"site workers need at least one process, not {processes}")
        self.processes = processes
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: the coordinator has threads (its API client, the temporary server's watcher)
        # by the time work is sent, and a forked child would inherit their locks mid-use
        context = multiprocessing.get_context("spawn")
        executor = ProcessPoolExecutor(self.processes, mp_context=context, initializer=_warm_up)
        for _ in range(self.processes):  # start every process now, not at the first call
            executor.submit(os.getpid)
        return executor

    def run_one(self, work: Callable[..., T], site_id: str, *args: Any) -> T | SiteFailure:
        """``work(*args)`` for ``site_id`` in a worker: its result, or the site's failure."""
        return self.run_each(work, [site_id], lambda _: args)[site_id]

    def run_each(
        self, work: Callable[..., T], site_ids: Sequence[str], args_for: Callable[[str], tuple[Any, ...]]
    ) -> dict[str, T | SiteFailure]:
        """``work(*args_for(site_id))`` at every site, side by side; a worker that died fails its sites only."""
        executor = self._running()
        futures = {site_id: executor.submit(guarded, work, site_id, *args_for(site_id)) for site_id in site_ids}
        outcomes: dict[str, T | SiteFailure] = {}
        for site_id, future in futures.items():
            try:
                outcomes[site_id] = future.result()
            except BrokenProcessPool:
                outcomes[site_id] = _worker_died(site_id)
        if any(isinstance(outcome, SiteFailure) and outcome.headline == _DIED for outcome in outcomes.values()):
            self._replace(executor)
        return outcomes

    def _running(self) -> ProcessPoolExecutor:
        """The pool, started again if it was rested or a dead worker broke it."""
        with self._lock:
            if self._executor is None:
                self._executor = self._start()
            return self._executor

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Drop a pool a dead worker broke (once, whichever thread saw it first); the next call starts a new one."""
        with self._lock:
            if self._executor is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    def rest(self) -> None:
        """Stop the processes while the job waits (for approvals, possibly days); the next call starts them."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.rest()

    def __enter__(self) -> SiteWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DIED = "Site worker died"


def _worker_died(site_id: str) -> SiteFailure:
    return SiteFailure(
        site_id,
        _DIED,
        f"site {site_id}: the worker process doing its work ended abruptly (out of memory, or killed)",
        "re-run the job; if it happens again, set deployment.site_processes: 0 to do the sites' work in one process",
    )


AUTO_MAX_PROCESSES = 4


AUTO_MIN_CORES = 4


def worker_count(setting: int | Literal["auto"], cores: int, load_1m: float) -> int:
    """How many site worker processes to start for ``deployment.site_processes``.

    "auto" starts one per core (at most ``AUTO_MAX_PROCESSES``) only on a machine with at least
    ``AUTO_MIN_CORES`` cores that is mostly idle (one-minute load average under half its cores). Workers
    pay off only with cores to spare: while they import torch and Great Expectations, the job's own
    process imports Prefect and MLflow and its temporary Prefect server starts, which on 2 cores already
    fills both (measured there: 53 s with two workers against 47 s without), and on a busy machine their
    imports only add work.
    """
    if setting != "auto":
        return setting
    if cores < AUTO_MIN_CORES or load_1m >= cores / 2:
        return 0
    return min(cores, AUTO_MAX_PROCESSES)


def start_site_workers(setting: int | Literal["auto"]) -> SiteWorkers | None:
    """The workers ``deployment.site_processes`` asks for on this machine now, or ``None`` (work stays here)."""
    processes = worker_count(setting, os.cpu_count() or 1, os.getloadavg()[0])
    return SiteWorkers(processes) if processes > 0 else None
