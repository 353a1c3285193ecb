"""Telling a slow site from an absent one while the coordinator waits for its reply.

Three signals per site: the Prefect state of its session's flow run (has its worker picked it up?),
the session's own heartbeat in the artifact store (is it alive and working?), and whether the site's
pool has a live worker (can it ever be picked up?). ``judge`` turns them into "keep waiting" or the
true reason to stop waiting; it is pure, so every case is a unit test. ``restart_session`` decides,
as purely, whether a session that ended before it ever served gets one more flow run: under load
its process can die on the way up (its engine's calls to an overloaded SQLite server refused, the
process killed) while the site itself is fine. ``PrefectWatch`` reads the first and last signal from
the Prefect API, at most once per ``REFRESH_S``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

REFRESH_S = 2.0  # how often the Prefect API is asked, whatever the reply polling rate
MISSED_WORKER_BEATS = 3  # Prefect's own rule: a worker that missed this many heartbeats is offline
DEFAULT_WORKER_BEAT_S = 30.0
# a loaded Prefect server on SQLite can fail to record a few heartbeats in a row: never call a worker
# gone sooner than this
MIN_WORKER_SILENCE_S = 60.0
SESSION_RESTARTS = 1  # new flow runs for a site whose session ended before it served, per job
# ... and for one whose worker could not even hand the run to a process: an overloaded Prefect server
# (SQLite, many sessions starting at once) refuses the worker's calls with 503; nothing of the job ran
UNSUBMITTED_RESTARTS = 4
UNSUBMITTED = "Failed to submit flow run to infrastructure"
PICKED_UP = frozenset({"PENDING", "RUNNING"})
ENDED = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED", "CANCELLING"})

Cause = Literal["absent", "slow start", "not picked up", "slow reply", "session ended"]


@dataclass(frozen=True)
class Signals:
    """What is known about one site's session at one moment; ``None`` where nothing is known."""

    run_state: str | None  # Prefect state type of the session's flow run, e.g. SCHEDULED, RUNNING, CRASHED
    silent_s: float | None  # seconds since the session last beat; None if it never did
    live_worker: bool | None  # whether the site's pool has a worker that beats
    run_message: str | None = None  # the message of that state (why a session crashed), if Prefect gave one


@dataclass(frozen=True)
class Allowances:
    startup_s: float  # from job start, for a session to start serving (deployment.session_start_timeout_s)
    reply_s: float  # from a request, for a serving session to answer it (deployment.round_deadline_s)
    gone_after_s: float  # heartbeat silence after which a session is dead, if its worker is gone too
    gone_anyway_s: float = 60.0  # heartbeat silence after which a session is dead whatever Prefect says


@dataclass(frozen=True)
class GiveUp:
    cause: Cause
    reason: str  # completes "site X did not answer: ..."


def judge(signals: Signals, since_start_s: float, since_request_s: float, allow: Allowances) -> GiveUp | None:
    """``None`` to keep waiting for the site, else why it will not answer this request.

    A site that is there is waited for until both its start-up allowance (from the job's start) and
    the reply deadline (from the request) have passed; one whose session ended, or whose pool has no
    live worker to ever start it, is given up at once.
    """
    state = signals.run_state
    overdue = since_request_s > allow.reply_s and since_start_s > allow.startup_s
    if signals.silent_s is not None:  # the session started serving at some point
        if state in ENDED:
            return GiveUp("session ended", f"its session ended ({state})")
        # a loaded machine can hold a beat back for a while: silence alone ends a session only after
        # gone_anyway_s, sooner when its pool has no live worker left to run it
        if signals.silent_s > allow.gone_anyway_s or (
            signals.silent_s > allow.gone_after_s and signals.live_worker is False
        ):
            return GiveUp("session ended", f"its session stopped beating {signals.silent_s:.0f}s ago")
        if overdue:
            return GiveUp(
                "slow reply",
                f"its session is alive but did not answer within {allow.reply_s:.0f}s "
                "(slow: raise deployment.round_deadline_s)",
            )
        return None
    if state in ENDED:
        detail = f"{state}: {signals.run_message}" if signals.run_message else state
        return GiveUp("session ended", f"its session ended ({detail}) before it started serving")
    if state in PICKED_UP:
        if overdue:
            return GiveUp(
                "slow start",
                f"its worker picked up the session, which did not start serving within {allow.startup_s:.0f}s "
                "(slow start: raise deployment.session_start_timeout_s)",
            )
        return None
    if signals.live_worker is False:
        return GiveUp("absent", "its pool has no live worker (absent)")
    if overdue:
        return GiveUp("not picked up", f"no worker picked up its session within {allow.startup_s:.0f}s")
    return None


def restart_session(
    give_up: GiveUp, signals: Signals, restarts_done: int, since_start_s: float, allow: Allowances
) -> bool:
    """Whether to start a new session for a site rather than give it up for ``give_up``.

    Only a session that ended before it ever beat (it never served, so nothing of the job is lost
    or repeated), only ``SESSION_RESTARTS`` times per site and job (``UNSUBMITTED_RESTARTS`` when its
    worker never got the run into a process), only while the start-up allowance lasts, and only when the
    site's pool still has a live worker to run the new one.
    """
    return (
        give_up.cause == "session ended"
        and signals.silent_s is None
        and restarts_done < restart_limit(signals)
        and since_start_s <= allow.startup_s
        and signals.live_worker is not False
    )


def restart_limit(signals: Signals) -> int:
    """How many new sessions a site may get: more when the worker never started the last one's process."""
    return UNSUBMITTED_RESTARTS if UNSUBMITTED in (signals.run_message or "") else SESSION_RESTARTS


def worker_is_live(last_heartbeat: datetime | None, interval_s: float | None, now: datetime) -> bool:
    """A worker is live until it missed ``MISSED_WORKER_BEATS`` heartbeats, and at least ``MIN_WORKER_SILENCE_S``."""
    if last_heartbeat is None:
        return False
    allowed = max(MISSED_WORKER_BEATS * (interval_s or DEFAULT_WORKER_BEAT_S), MIN_WORKER_SILENCE_S)
    return (now - last_heartbeat).total_seconds() <= allowed


class PrefectWatch:
    """The Prefect side of ``Signals``: flow-run states of the sessions and live workers of the pools."""

    def __init__(self, flow_runs: dict[str, str], pool_of: dict[str, str]) -> None:
        self.flow_runs = flow_runs  # site -> flow run id
        self.pool_of = pool_of  # site -> work pool name
        self._states: dict[str, str] = {}
        self._messages: dict[str, str] = {}
        self._live: dict[str, bool] = {}
        self._read_at = float("-inf")

    def refresh(self, site_ids: Sequence[str]) -> None:
        """Ask the API about ``site_ids`` (run state, live worker) unless it was asked less than ``REFRESH_S`` ago."""
        if time.monotonic() - self._read_at < REFRESH_S or not site_ids:
            return
        import httpx

        # the API briefly unreachable: the last signals stand, and the deadlines still hold
        with contextlib.suppress(httpx.HTTPError):
            self._read(site_ids)
        self._read_at = time.monotonic()

    def _read(self, site_ids: Sequence[str]) -> None:
        from uuid import UUID

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.exceptions import ObjectNotFound

        site_ids = [s for s in site_ids if s in self.flow_runs]  # sessions this runner did not start: no signals
        if not site_ids:
            return
        ids = [UUID(self.flow_runs[s]) for s in site_ids]
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))
            by_id = {str(run.id): run for run in runs}
            for site_id in site_ids:
                run = by_id.get(self.flow_runs.get(site_id, ""))
                if run is not None and run.state_type is not None:
                    self._states[site_id] = str(run.state_type.value)
                    message = run.state.message if run.state is not None else None
                    self._messages[site_id] = " ".join(str(message or "").split())[:300]
            now = datetime.now(UTC)
            for site_id in site_ids:
                try:
                    workers = client.read_workers_for_work_pool(self.pool_of[site_id])
                except ObjectNotFound:  # no such pool: nothing can ever pick the session up
                    workers = []
                self._live[site_id] = any(
                    worker_is_live(w.last_heartbeat_time, w.heartbeat_interval_seconds, now) for w in workers
                )

    def state(self, site_id: str) -> str | None:
        return self._states.get(site_id)

    def message(self, site_id: str) -> str | None:
        return self._messages.get(site_id) or None

    def forget(self, site_id: str) -> None:
        """Drop what was read about the site's session (it has a new flow run); its pool's worker stays known."""
        self._states.pop(site_id, None)
        self._messages.pop(site_id, None)
        self._read_at = float("-inf")

    def live_worker(self, site_id: str) -> bool | None:
        return self._live.get(site_id)
