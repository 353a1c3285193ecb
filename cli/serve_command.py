"""``quorum serve --site ID``: the site's inference service in the foreground, until Ctrl-C.

A site command: it opens the site's own context (no MLflow, no tracking server), as the ``serve-ID``
flow does.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from quorum.configs.schema import load_federation, load_governance
from quorum.lineage.state import StateLayout, configure_environment

if TYPE_CHECKING:
    from quorum.flows.deploy import SiteContext


@contextmanager
def stop_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``KeyboardInterrupt`` for the block, then restore the handlers.

    Installed whatever the process inherited, as HTTP servers do: a service started from a script's
    ``&`` inherits SIGINT ignored, and would otherwise never answer Ctrl-C; ``docker stop``, systemd
    and ``kill`` send SIGTERM, whose default would end the process before the routing counts are saved.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve(config_path: Path, governance_path: Path, site_id: str, port: int | None, runtime: str | None) -> int:
    config = load_federation(config_path)
    load_governance(governance_path)
    config.site(site_id)
    state = StateLayout(config.state_dir)
    configure_environment(state)
    from quorum.flows.deploy import load_site_context

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ctx = load_site_context(str(config_path), str(governance_path), site_id)
    with stop_signals():
        return _serve_until_stopped(ctx, site_id, port, runtime)


def _serve_until_stopped(ctx: SiteContext, site_id: str, port: int | None, runtime: str | None) -> int:
    from quorum.flows.serving import start_service, wait_for_interrupt

    running = start_service(ctx, site_id, port, runtime)
    # from here on a Ctrl-C must reach `stop`: the banner tells a client it may call (and interrupt)
    # the service, so it is printed inside the block, never before it
    try:
        champion = running.service.champion
        assert champion is not None  # start_service raises otherwise
        policy = running.service.policy
        print(
            f"{site_id} serves {ctx.config.model_name} v{champion.version} ({champion.scorer.runtime}, "
            f"policy {policy.mode}) at {running.url}\n"
            f"  POST {running.url}/predict   GET {running.url}/health   GET {running.url}/metrics   (Ctrl-C stops)",
            flush=True,
        )
        wait_for_interrupt()
    except KeyboardInterrupt:
        print("stopping: requests in flight finish, routing counts are saved", flush=True)
    finally:
        running.stop()
    return 0
