"""The site's inference service as a Prefect flow, so each site pool has a ``serve-<site>`` deployment.

The flow verifies and loads the champion, then answers on 127.0.0.1 until its run is cancelled;
``quorum serve --site ID`` runs the same service without Prefect.
"""

from __future__ import annotations

import threading

from prefect import flow, get_run_logger

from quorum.flows.context import load_context
from quorum.flows.serving import start_service


@flow(name="serve", flow_run_name="serve-{site_id}")
def serve_flow(config_path: str, governance_path: str, site_id: str, port: int | None = None) -> None:
    """Serve the verified champion at ``site_id`` until cancelled; hot-swaps when the champion moves."""
    ctx = load_context(config_path, governance_path)
    running = start_service(ctx, site_id, port)
    champion = running.service.champion
    assert champion is not None  # start_service raises otherwise
    get_run_logger().info("%s serves %s v%s at %s", site_id, ctx.config.model_name, champion.version, running.url)
    try:
        threading.Event().wait()  # until the flow run is cancelled (the process is stopped)
    finally:
        running.stop()
