"""Site capacity on Prefect: each site's ``concurrency`` as its work pool's limit, and each pool's queue.

A site runs one session per job (``flows/runners/site_session.py``). With ``sites.ID.concurrency: N``
its pool runs at most N flow runs at once; Prefect's workers take no more, so a further job's session
waits in the pool's queue (state Scheduled) until a running one ends, instead of overloading the site.
``quorum up`` applies the limits; the queues are read in ``quorum.flows.site_queue``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quorum.configs.schema import FederationConfig
from quorum.infra.deployments import site_pool

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient


def apply_site_concurrency(client: SyncPrefectClient, config: FederationConfig) -> dict[str, int | None]:
    """Set every site pool's concurrency limit from ``sites.ID.concurrency`` (None clears a limit)."""
    from prefect.client.schemas.actions import WorkPoolUpdate

    limits = {site_pool(site.id): site.concurrency for site in config.sites}
    for pool, limit in limits.items():
        client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=limit))
    return limits
