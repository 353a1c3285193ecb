"""Telling a slow site from an absent one: every case of ``judge`` on literal signals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from quorum.flows.runners.liveness import Allowances, Signals, judge, restart_session, worker_is_live

ALLOW = Allowances(startup_s=180, reply_s=120, gone_after_s=10)


@pytest.mark.parametrize(
    ("signals", "since_start_s", "since_request_s"),
    [
        # picked up by its worker, still importing: inside the start-up allowance
        (Signals("RUNNING", None, True), 170, 170),
        # scheduled, its pool has a live worker that has not polled yet
        (Signals("SCHEDULED", None, True), 60, 60),
        # serving and beating, past the reply deadline but inside the start-up allowance
        (Signals("RUNNING", 1.0, True), 150, 130),
        # serving and beating, a later request inside its reply deadline
        (Signals("RUNNING", 1.0, True), 900, 100),
        # nothing known from Prefect yet (first look), fresh job
        (Signals(None, None, None), 1, 1),
        # a beat held back 20 s by a loaded machine while its worker is alive: slow, not dead
        (Signals("RUNNING", 20.0, True), 900, 5),
    ],
)
def test_a_site_that_is_there_is_waited_for(signals: Signals, since_start_s: float, since_request_s: float) -> None:
    assert judge(signals, since_start_s, since_request_s, ALLOW) is None


@pytest.mark.parametrize(
    ("signals", "since_start_s", "since_request_s", "cause", "words"),
    [
        # no live worker on its pool and nobody picked the run up: absent, at once
        (Signals("SCHEDULED", None, False), 1, 1, "absent", "no live worker"),
        # picked up but never started serving within both allowances
        (Signals("RUNNING", None, True), 181, 181, "slow start", "session_start_timeout_s"),
        # scheduled with a live worker that never picked it up
        (Signals("SCHEDULED", None, True), 181, 181, "not picked up", "no worker picked up"),
        # serving, alive, but this request took longer than the reply deadline
        (Signals("RUNNING", 0.5, True), 900, 121, "slow reply", "round_deadline_s"),
        # its session served, then stopped beating and its worker is gone (worker killed)
        (Signals("RUNNING", 11.0, False), 900, 5, "session ended", "stopped beating 11s ago"),
        # silent for a minute, whatever Prefect says about its worker
        (Signals("RUNNING", 61.0, True), 900, 5, "session ended", "stopped beating 61s ago"),
        # its flow run crashed before it ever beat
        (Signals("CRASHED", None, True), 5, 5, "session ended", "CRASHED"),
    ],
)
def test_a_site_is_given_up_with_the_true_cause(
    signals: Signals, since_start_s: float, since_request_s: float, cause: str, words: str
) -> None:
    give_up = judge(signals, since_start_s, since_request_s, ALLOW)

    assert give_up is not None and give_up.cause == cause and words in give_up.reason


def test_a_slow_start_is_not_called_absent_or_a_data_problem() -> None:
    give_up = judge(Signals("PENDING", None, True), 200, 200, ALLOW)

    assert give_up is not None and "absent" not in give_up.reason and "data" not in give_up.reason


@pytest.mark.parametrize(
    ("age_s", "interval_s", "live"),
    [
        (20, 30, True),  # beat within its interval
        (89, 30, True),  # two beats missed
        (91, 30, False),  # three beats missed: Prefect's own offline rule
        (59, 5, True),  # a fast-beating worker: never gone before a minute (heartbeats lost by a busy server)
        (61, 5, False),  # ... and gone after it
        (20, None, True),  # interval unknown: Prefect's default of 30 s
    ],
)
def test_a_worker_is_live_for_three_heartbeats_and_a_minute(age_s: float, interval_s: float | None, live: bool) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)

    assert worker_is_live(now - timedelta(seconds=age_s), interval_s, now) is live


def test_a_worker_that_never_beat_is_not_live() -> None:
    assert worker_is_live(None, 30, datetime(2026, 1, 1, tzinfo=UTC)) is False


CRASH = "Process exited with status code: 1."


def test_a_crash_before_serving_is_reported_with_prefects_own_message() -> None:
    give_up = judge(Signals("CRASHED", None, True, CRASH), 5, 5, ALLOW)

    assert give_up is not None and give_up.reason == f"its session ended (CRASHED: {CRASH}) before it started serving"


UNSUBMITTED_CRASH = (
    "Failed to submit flow run to infrastructure: PrefectHTTPStatusError: Server error '503 Service Unavailable'"
)


@pytest.mark.parametrize(
    ("signals", "restarts_done", "since_start_s", "restart"),
    [
        # crashed on the way up, first time, early in the job, its worker alive: a new session
        (Signals("CRASHED", None, True, CRASH), 0, 5, True),
        # the same, Prefect not yet sure about the worker: the new run waits in its pool like the first
        (Signals("FAILED", None, None), 0, 170, True),
        # already restarted once in this job: give it up
        (Signals("CRASHED", None, True, CRASH), 1, 5, False),
        # the start-up allowance is spent: give it up
        (Signals("CRASHED", None, True, CRASH), 0, 181, False),
        # its pool has no live worker left to run a new session: give it up
        (Signals("CRASHED", None, False, CRASH), 0, 5, False),
        # it had served (it beat): a restart would not bring back what it held; give it up
        (Signals("CRASHED", 3.0, True, CRASH), 0, 5, False),
        # its worker could not hand the run to a process (the server answered 503): nothing ran, try again
        (Signals("CRASHED", None, True, UNSUBMITTED_CRASH), 1, 5, True),
        (Signals("CRASHED", None, True, UNSUBMITTED_CRASH), 3, 100, True),
        # ... but not without end
        (Signals("CRASHED", None, True, UNSUBMITTED_CRASH), 4, 5, False),
    ],
)
def test_a_session_that_ended_before_it_served_is_started_again_once(
    signals: Signals, restarts_done: int, since_start_s: float, restart: bool
) -> None:
    give_up = judge(signals, since_start_s, 1, ALLOW)

    assert give_up is not None and give_up.cause == "session ended"
    assert restart_session(give_up, signals, restarts_done, since_start_s, ALLOW) is restart


@pytest.mark.parametrize(
    "signals",
    [
        Signals("SCHEDULED", None, False),  # absent
        Signals("RUNNING", None, True),  # slow start
        Signals("RUNNING", 0.5, True),  # slow reply
    ],
)
def test_only_a_session_that_ended_is_ever_restarted(signals: Signals) -> None:
    give_up = judge(signals, 200, 200, ALLOW)

    assert give_up is not None and restart_session(give_up, signals, 0, 1, ALLOW) is False
