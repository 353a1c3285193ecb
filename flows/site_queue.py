"""Site queues: how many jobs each site's work pool runs and holds, and waiting for a place in them.

A site's ``concurrency`` is its pool's concurrency limit (set by ``quorum up``). A job whose session
finds the pool full waits in the pool's queue (its flow run stays Scheduled); the coordinator of that
job waits too, up to ``placement.queue_timeout_s``, instead of counting the site as absent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quorum.configs.errors import QuorumError

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

POLL_S = 1.0


@dataclass(frozen=True)
class PoolQueue:
    """One work pool's flow runs by state, and its concurrency limit (None: unlimited)."""

    pool: str
    limit: int | None
    scheduled: int
    pending: int
    running: int

    @property
    def at_capacity(self) -> bool:
        return self.limit is not None and self.pending + self.running >= self.limit

    def describe(self) -> str:
        limit = "no limit" if self.limit is None else f"limit {self.limit}"
        full = ", at capacity" if self.at_capacity else ""
        return f"{self.running} running, {self.pending} pending, {self.scheduled} queued ({limit}{full})"


def pool_queues(client: SyncPrefectClient, pools: list[str]) -> dict[str, PoolQueue]:
    """Each pool's scheduled (queued, incl. late), pending and running flow runs, and its limit."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    queues = {}
    for pool in pools:
        try:
            limit = client.read_work_pool(pool).concurrency_limit
        except ObjectNotFound:
            continue
        counts = {}
        for state in (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING):
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[state]))),
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            )
            counts[state] = len(runs)
        queues[pool] = PoolQueue(
            pool, limit, counts[StateType.SCHEDULED], counts[StateType.PENDING], counts[StateType.RUNNING]
        )
    return queues


def queued_sessions(client: SyncPrefectClient, sessions: Mapping[str, str]) -> dict[str, PoolQueue]:
    """The sites whose session waits behind a full pool (Scheduled while the pool is at its limit)."""
    from prefect.client.schemas.objects import StateType

    waiting = {}
    for site_id, flow_run_id in sessions.items():
        run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]  # a UUID's string form is accepted
        if run.state_type != StateType.SCHEDULED or not run.work_pool_name:
            continue
        queue = pool_queues(client, [run.work_pool_name]).get(run.work_pool_name)
        if queue is not None and queue.at_capacity:
            waiting[site_id] = queue
    return waiting


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("quorum.site_queue")


def wait_for_capacity(sessions: Mapping[str, str], job_id: str, timeout_s: float, poll_s: float = POLL_S) -> None:
    """Return once no session of this job is queued behind a full site pool; give up after ``timeout_s``.

    A session that is Scheduled on a pool with room (no live worker) is not waited for here: that is an
    absent site, which the first request's deadline reports.
    """
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    told: set[str] = set()
    with get_client(sync_client=True) as client:
        while waiting := queued_sessions(client, sessions):
            for site_id in sorted(set(waiting) - told):
                _logger().info(
                    "site %s is at capacity (%s): job %s waits in its queue",
                    site_id,
                    waiting[site_id].describe(),
                    job_id,
                )
            told |= set(waiting)
            if time.monotonic() >= deadline:
                busy = ", ".join(f"{s} ({q.describe()})" for s, q in sorted(waiting.items()))
                raise QuorumError(
                    f"job {job_id} waited {timeout_s:g}s for a place at site(s) still running other jobs: {busy}",
                    fix="wait for those jobs (`quorum status` shows the queues), raise sites.ID.concurrency "
                    "and run `quorum up` again, or raise placement.queue_timeout_s",
                )
            time.sleep(poll_s)
