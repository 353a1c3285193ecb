"""The site session: one flow run per site per job, on that site's own work pool.

Starting a flow run on a process worker costs a new Python process and its imports (10-20 s each
under load), so a session starts once per job and then serves every request of the job through the
artifact store: preprocess, every round's training, evaluation and monitoring. It waits for the
coordinator's newest request, verifies the weights' sha256, does the site work on its own data and
writes its reply. It beats from the moment it starts, so the coordinator can tell it is slow rather
than absent. A restarted session resumes at the newest request; requests it missed are already
settled without it.

A session imports only site code: no MLflow, no registry, and Evidently only when a site writes its
HTML drift report (``tests/test_site_session_imports.py`` holds that line).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from quorum.configs.errors import ConfigError, QuorumError
from quorum.configs.schema import FederationConfig, load_federation
from quorum.configs.site_pins import require_pinned
from quorum.flows.runners.exchange import JobExchange
from quorum.lineage.artifacts import LocalArtifactStore, federation_store
from quorum.lineage.state import SITE_ROOT_ENV
from quorum.tasks import site as site_work
from quorum.tasks import site_secagg, wire
from quorum.tasks.training import torch_threads
from quorum.tasks.wire import Request

POLL_S = 0.05
HEARTBEAT_S = 1.0


def check_site_root(config: FederationConfig, site_id: str) -> None:
    """A worker is given exactly one data root; refuse work for any other site's data."""
    allowed = os.environ.get(SITE_ROOT_ENV)
    root = config.site(site_id).root
    if allowed and Path(allowed).resolve() != root.resolve():
        raise ConfigError(
            f"this worker serves data root {allowed}, but site {site_id}'s root is {root}",
            fix=f"start a worker for site {site_id} with {SITE_ROOT_ENV}={root} (quorum up does this)",
        )


def handle(config: FederationConfig, site_id: str, exchange: JobExchange, request: Request) -> None:
    """Do one request's work for this site and write the reply (or the expected failure)."""
    try:
        if request.kind == "preprocess":
            exchange.reply(request.seq, site_id, wire.encode_fingerprint(site_work.preprocess_site(config, site_id)))
        elif request.kind == "train":
            _train(config, site_id, exchange, request)
        elif request.kind == "keys":
            key = site_secagg.round_keys(config, site_id, request.job_id, request.server_round)
            exchange.reply(request.seq, site_id, wire.encode_public_key(site_id, key))
        elif request.kind in ("share", "reveal"):
            _secagg_step(config, site_id, exchange, request)
        elif request.kind == "evaluate":
            result = site_work.evaluate_site(config, site_id, exchange.request_weights(request))
            exchange.reply(request.seq, site_id, wire.encode_evaluation(result))
        elif request.kind == "variants":
            _compare_variants(config, site_id, exchange, request)
        elif request.kind == "monitor":
            champion = exchange.request_weights(request) if request.weights_key else None
            summary = site_work.monitor_site(config, site_id, champion)
            exchange.reply(request.seq, site_id, wire.encode_drift(summary))
    except QuorumError as error:
        exchange.fail(request.seq, site_id, error)


def _compare_variants(config: FederationConfig, site_id: str, exchange: JobExchange, request: Request) -> None:
    """Score the test split with the candidate in torch and with each shipped ONNX variant; counts only."""
    from quorum.tasks.variants import compare_site  # ONNX Runtime loads only when a promotion compares

    weights, variants = exchange.request_weights(request), exchange.request_files(request)
    counts = compare_site(config, site_id, weights, variants)
    exchange.reply(request.seq, site_id, wire.encode_variant_counts(site_id, counts))


def _secagg_step(config: FederationConfig, site_id: str, exchange: JobExchange, request: Request) -> None:
    """Share this site's secrets with its neighbourhood, or reveal its shares to unmask the round's sum."""
    job, server_round, peers = request.job_id, request.server_round, request.peer_keys()
    if request.kind == "share":
        out = site_secagg.share_keys(config, site_id, job, server_round, peers)
    else:
        mine = request.shares_for(site_id)
        out = site_secagg.reveal_shares(config, site_id, job, server_round, peers, request.dropped, mine)
    exchange.reply(request.seq, site_id, wire.encode_shares(site_id, out))


def _train(config: FederationConfig, site_id: str, exchange: JobExchange, request: Request) -> None:
    """Train and reply with the new weights, or, when the request carries peer keys, with one masked vector."""
    weights = exchange.request_weights(request)
    if request.peers is not None:
        masked = site_secagg.train_site_masked(
            config, site_id, weights, request.server_round, request.job_id, request.peer_keys(), request.dropped
        )
        update: site_work.SiteUpdate | site_secagg.MaskedUpdate = masked
        arrays: list[Any] = [masked.masked]
    else:
        update = plain = site_work.train_site(config, site_id, weights, request.server_round)
        arrays = plain.weights
    reply = wire.TrainReply(
        site_id=site_id,
        job_id=request.job_id,
        server_round=update.server_round,
        num_examples=update.num_examples,
        train_loss=update.train_loss,
        train_s=update.train_s,
        masked=request.peers is not None,
    )
    exchange.reply(request.seq, site_id, wire.encode_train_reply(reply), arrays)


@contextmanager
def _heartbeat(exchange: JobExchange, site_id: str) -> Iterator[None]:
    """Beat every second from a thread, also while a long request is being worked on."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            exchange.beat(site_id)
            stop.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, name=f"heartbeat-{site_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def serve(
    config: FederationConfig, site_id: str, exchange: JobExchange, idle_timeout_s: float, poll_s: float = POLL_S
) -> int:
    """Answer requests until the coordinator says stop or stays silent for ``idle_timeout_s``."""
    logger = get_run_logger()
    done = exchange.replied(site_id)
    served, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < idle_timeout_s:
        request = exchange.latest()
        if request is None or request.seq <= done:
            time.sleep(poll_s)
            continue
        if request.kind == "stop":
            break
        if site_id in request.sites:
            started = time.monotonic()
            with torch_threads(1):  # sites share the host's cores: a thread pool each would oversubscribe them
                handle(config, site_id, exchange, request)
            served += 1
            logger.info(
                "%s %s round %d in %.2fs", site_id, request.kind, request.server_round, time.monotonic() - started
            )
        done, idle_since = request.seq, time.monotonic()
    return served


def warm_up() -> None:
    """Import what every job needs (data contracts, torch) while beating, before the first request.

    Evidently is not among them: drift statistics are computed without it, and its HTML report is
    imported only where a site writes one.
    """
    import great_expectations  # noqa: F401

    import quorum.tasks.training  # noqa: F401  (torch)


@flow(name="site-session")
def site_session(config_path: str, site_id: str, job_id: str, store_root: str, idle_timeout_s: float = 900.0) -> int:
    """Serve one job at one site; runs on the site's own work pool."""
    require_pinned(config_path)
    config = load_federation(config_path)
    check_site_root(config, site_id)
    # an S3 store is opened from the config, with this site's own cache and credentials; a local
    # store is the coordinator's folder, which this host shares
    store = federation_store(config, site_id) if config.storage.artifacts else LocalArtifactStore(Path(store_root))
    exchange = JobExchange(store, job_id)
    with _heartbeat(exchange, site_id):
        warm_up()
        get_run_logger().info("site %s joined job %s (cwd %s)", site_id, job_id, os.getcwd())
        return serve(config, site_id, exchange, idle_timeout_s, max(POLL_S, store.poll_s))
