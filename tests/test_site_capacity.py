"""Site capacity against a real (temporary) Prefect API: `quorum up`'s concurrency limits on the site pools,
a second job's session held in the queue of a full pool, the queue report `quorum status` prints, and the
coordinator waiting for its place (or giving up with a fix)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from quorum.configs.errors import QuorumError
from quorum.configs.schema import FederationConfig


def config() -> FederationConfig:
    return FederationConfig.model_validate(
        {
            "name": "capacity",
            "model_name": "m",
            "features": {"numeric": ["x"]},
            "sites": {"paris": {"root": "p", "concurrency": 1}, "boston": {"root": "b"}},
        }
    )


@pytest.fixture
def client(prefect_harness: Path) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for pool in ("site-paris", "site-boston"):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        yield client


def two_sessions(client: Any) -> tuple[str, str]:
    """Two jobs' sessions on site paris's pool: the first running, the second just submitted."""
    from prefect.states import Running

    flow_id = client.create_flow_from_name("site-session")
    deployment = client.create_deployment(flow_id, "session-paris", work_pool_name="site-paris")
    first = client.create_flow_run_from_deployment(deployment, tags=["job:first"])
    second = client.create_flow_run_from_deployment(deployment, tags=["job:second"])
    client.set_flow_run_state(first.id, Running(), force=True)
    return str(first.id), str(second.id)


def picked_up(client: Any, pool: str) -> set[str]:
    """What a worker polling ``pool`` would be handed now (Prefect applies the pool's limit here)."""
    soon = datetime.now(UTC) + timedelta(minutes=5)
    return {str(r.flow_run.id) for r in client.get_scheduled_flow_runs_for_work_pool(pool, scheduled_before=soon)}


def test_up_sets_each_site_pools_concurrency_limit_from_the_config(client: Any) -> None:
    from quorum.infra.capacity import apply_site_concurrency

    limits = apply_site_concurrency(client, config())

    assert limits == {"site-paris": 1, "site-boston": None}
    assert client.read_work_pool("site-paris").concurrency_limit == 1
    assert client.read_work_pool("site-boston").concurrency_limit is None


def test_a_second_job_queues_at_a_site_at_capacity_and_the_coordinator_waits_for_its_place(client: Any) -> None:
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.states import Completed

    from quorum.flows.site_queue import pool_queues, queued_sessions, wait_for_capacity
    from quorum.infra.capacity import apply_site_concurrency

    apply_site_concurrency(client, config())
    first, second = two_sessions(client)

    queue = pool_queues(client, ["site-paris"])["site-paris"]
    assert (queue.running, queue.scheduled, queue.limit, queue.at_capacity) == (1, 1, 1, True)
    assert queue.describe() == "1 running, 0 pending, 1 queued (limit 1, at capacity)"
    assert picked_up(client, "site-paris") == set()  # no worker is handed the second job: it waits
    assert set(queued_sessions(client, {"paris": second})) == {"paris"}
    with pytest.raises(QuorumError) as info:
        wait_for_capacity({"paris": second}, "second", timeout_s=0.2, poll_s=0.05)
    assert "site(s) still running other jobs: paris (1 running" in info.value.message
    assert "sites.ID.concurrency" in info.value.fix

    client.set_flow_run_state(first, Completed(), force=True)  # the first job ends

    wait_for_capacity({"paris": second}, "second", timeout_s=0.2, poll_s=0.05)  # returns: there is room now
    assert picked_up(client, "site-paris") == {second}

    client.update_work_pool("site-paris", WorkPoolUpdate(concurrency_limit=None))  # leave the pool as found
