"""A site session that crashes before it serves is started again once, then given up with both reasons.

Against the session's Prefect API: the site's pool has a worker that beats (registered through the
API), the runner starts the site's session and waits for its preprocess reply; the session's flow
run is then crashed as a worker reports a process that died on the way up. The runner starts a new
flow run for the site; when that one crashes too, the site is given up, and the failure names the
restart and both crashes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from quorum.flows.runners.local import SiteFailure
from quorum.flows.runners.pool import site_pool
from tests.prefect_server import wait_until
from tests.session_pools import pool_runner

SITE = "phoenix"  # a name no other test's pool uses on the shared API
FIRST_CRASH = "Process exited with status code: 1."
SECOND_CRASH = "Process exited with status code: -9."


def test_a_session_that_crashed_before_serving_is_restarted_once(prefect_harness: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    # Arrange: one site, its pool and session deployment, a worker beating on the pool
    runner = pool_runner(tmp_path, SITE, "restart-job")
    runner.start([SITE])
    first = runner.flow_runs[SITE]
    replies: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: replies.update(runner.preprocess([SITE])), daemon=True)

    # Act: the first session crashes on the way up, then its replacement does too
    waiting.start()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(first, Crashed(message=FIRST_CRASH), force=True)
        wait_until(lambda: runner.flow_runs[SITE] != first, 60, "no new session was started")
        second = runner.flow_runs[SITE]
        assert client.read_flow_run(second).work_pool_name == site_pool(SITE)
        client.set_flow_run_state(second, Crashed(message=SECOND_CRASH), force=True)
    waiting.join(timeout=120)

    # Assert: one restart, then the site given up with the restart and both crashes in its reason
    assert not waiting.is_alive()
    failure = replies[SITE]
    assert isinstance(failure, SiteFailure)
    assert f"its session ended (CRASHED: {SECOND_CRASH}) before it started serving" in failure.message
    assert f"after one restart (first: its session ended (CRASHED: {FIRST_CRASH})" in failure.message
    assert set(runner.restarts) == {SITE}
