"""The site's inference service as a Prefect flow, so each site pool has a ``serve-<site>`` deployment.

The flow verifies and loads the champion, then answers on 127.0.0.1 until its run is cancelled;
``quorum serve --site ID`` runs the same service without Prefect. ``quorum up`` starts one run per
site (``serving.start_with_up``) with ``wait_for_champion``, so a federation with nothing promoted
yet answers 503 until its first champion verifies. While it serves, the run records its process id,
port and flow run id in the site's ``deployed/serving/service.json``, which ``quorum down`` reads
to stop exactly this process should cancelling the flow run not reach it.

Like the site's other flows it runs site code only (``tests/test_site_flow_imports.py``): the context
is the site's (``load_site_context``: its own view of the artifact store, no tracking client), and the
models come from the artifact store, never from MLflow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from quorum.flows.deploy import load_site_context
from quorum.flows.serving import start_service, wait_for_interrupt
from quorum.flows.serving_models import SERVING_DIR

SERVICE_RECORD = "service.json"


def service_record(site_root: Path) -> Path:
    """Where a running serve flow records its pid, port and flow run id at the site."""
    return site_root / SERVING_DIR / SERVICE_RECORD


@flow(name="serve", flow_run_name="serve-{site_id}")
def serve_flow(
    config_path: str, governance_path: str, site_id: str, port: int | None = None, wait_for_champion: bool = False
) -> None:
    """Serve the verified champion at ``site_id`` until cancelled; hot-swaps when the champion moves."""
    ctx = load_site_context(config_path, governance_path, site_id)
    running = start_service(ctx, site_id, port, wait_for_champion=wait_for_champion)
    record = service_record(ctx.config.site(site_id).root)
    # from here on an interrupt must reach `stop`: the record tells `quorum down` (and a client) that
    # the service runs, so it is written inside the block, never before it
    try:
        champion = running.service.champion
        serving = f"{ctx.config.model_name} v{champion.version}" if champion else "nothing yet (503 until a champion)"
        get_run_logger().info("%s serves %s at %s", site_id, serving, running.url)
        context = FlowRunContext.get()
        flow_run = None if context is None or context.flow_run is None else str(context.flow_run.id)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(
            json.dumps({"pid": os.getpid(), "port": running.server.server_address[1], "flow_run_id": flow_run}) + "\n"
        )
        wait_for_interrupt()  # until the flow run is cancelled (the process is stopped)
    finally:
        record.unlink(missing_ok=True)
        running.stop()
