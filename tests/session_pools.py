"""A pool runner against the session's Prefect API, for the tests of how it starts and restarts sessions.

The site's pool, its session deployment and a worker that beats on the pool are registered through
the API (no worker process runs), so a test drives the session flow runs' states itself.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from quorum.flows.context import load_context
from quorum.flows.runners.pool import PoolRunner, site_pool
from tests.federation import write_federation, write_governance


def pool_runner(tmp_path: Path, site: str, job_id: str) -> PoolRunner:
    """A runner for a one-site federation whose pool has a session deployment and a live worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    deadlines = {"round_deadline_s": 120.0, "session_start_timeout_s": 120.0}
    config_path = write_federation(tmp_path, (site,), min_sites=1, extra={"deployment": deadlines})
    governance, _ = write_governance(tmp_path)
    ctx = load_context(str(config_path), str(governance), job_id)
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name=site_pool(site), type="process"))
        flow_id = client.create_flow_from_name("site-session")
        client.create_deployment(flow_id, f"session-{site}", work_pool_name=site_pool(site))
        client.send_worker_heartbeat(site_pool(site), "beating-worker", heartbeat_interval_seconds=30)
    return PoolRunner(ctx, str(config_path))
