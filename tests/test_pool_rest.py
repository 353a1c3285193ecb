"""A pool job that waits for its approvers stops its sessions, and starts new ones for monitoring.

A session serves until it is told to stop or stays idle for 15 minutes, and approvals can take days.
Against the session's Prefect API: the runner starts a site's session, rests (as the lifecycle does
before it pauses for approval), then asks for monitoring. The stop request must come first, the new
session must be a new flow run on the site's pool started after the monitoring request was posted
(a session starts at the newest request: had it found the stop, it would have ended at once), and
the stopped session's old heartbeat must not count against the new one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from quorum.configs.errors import QuorumError
from quorum.flows.runners.local import SiteFailure
from quorum.flows.runners.pool import site_pool
from tests.prefect_server import wait_until
from tests.session_pools import pool_runner

SITE = "quebec"  # a name no other test's pool uses on the shared API
SEEN_BY_THE_NEW_SESSION = "the new session read the monitoring request"


def test_rest_stops_the_sessions_and_the_next_request_starts_new_ones(prefect_harness: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    # Arrange: one site, its pool and session deployment, a worker beating on the pool; its first
    # session beat long ago (it served the job's earlier stages)
    runner = pool_runner(tmp_path, SITE, "rest-job")
    runner.start([SITE])
    first = runner.flow_runs[SITE]
    an_hour_ago = {"site_id": SITE, "at": time.time() - 3600}
    runner.exchange.store.put_json(runner.exchange._key("sessions", f"{SITE}.json"), an_hour_ago)

    # Act 1: rest, as the lifecycle does before it pauses for approval
    runner.rest()

    # Assert 1: the sessions are told to stop, and no new one is started yet
    stop = runner.exchange.latest()
    assert stop is not None and stop.kind == "stop"
    assert runner.flow_runs[SITE] == first

    # Act 2: monitoring, answered by whatever the new session finds first
    seen: dict[str, Any] = {}

    def new_session() -> None:
        wait_until(lambda: runner.flow_runs[SITE] != first, 60, "no new session was started")
        time.sleep(3)  # a session takes a while to start: the runner meanwhile must not give the site up
        request = runner.exchange.latest()
        seen["request"] = request
        assert request is not None
        runner.exchange.beat(SITE)
        runner.exchange.fail(request.seq, SITE, QuorumError(SEEN_BY_THE_NEW_SESSION, fix="none"))

    site = threading.Thread(target=new_session, daemon=True)
    site.start()
    replies = runner.monitor([SITE], None)
    site.join(timeout=60)

    # Assert 2: a new flow run on the site's pool, started after the monitoring request was posted
    assert seen["request"].kind == "monitor" and seen["request"].seq > stop.seq
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(runner.flow_runs[SITE]).work_pool_name == site_pool(SITE)
    failure = replies[SITE]
    assert isinstance(failure, SiteFailure) and SEEN_BY_THE_NEW_SESSION in failure.message
    assert not runner.resting
