"""Coordination overhead of the two site runners on the same job.

4 sites, 10 rounds, the same small model, through the in-process runner and through the pool
runner (a real Prefect server on a free loopback port, one process worker per site pool). Per round:
coordination overhead = round wall time minus the sites' own training time: the slowest site's in
pool mode (sites train side by side), the sum over sites in-process (one after the other). Also the job
start-up time (sessions started until every site answered its first request). Prints figures only.

Run: .venv/bin/python bench/pool_overhead.py
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = Path(tempfile.mkdtemp(prefix="quorum-bench-pool-"))
os.environ["PREFECT_HOME"] = str(WORK / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"

SITES = ("s1", "s2", "s3", "s4")
ROUNDS = 10


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rounds(runner, config, fingerprints, side_by_side: bool) -> list[float]:  # type: ignore[no-untyped-def]
    from quorum.flows.tuning import start_weights
    from quorum.tasks.aggregate import fedavg

    weights, _ = start_weights(config, fingerprints)
    overheads = []
    for server_round in range(1, ROUNDS + 1):
        started = time.perf_counter()
        replies = runner.train(list(SITES), weights, server_round)
        wall = time.perf_counter() - started
        updates = list(replies.values())
        training = [u.train_s for u in updates]
        overheads.append(wall - (max(training) if side_by_side else sum(training)))
        weights = fedavg([(u.weights, u.num_examples) for u in updates])
    return overheads


def _local(config_path: Path, governance_path: Path) -> tuple[float, list[float]]:
    from prefect import flow

    from quorum.flows.context import load_context
    from quorum.flows.runners.local import LocalRunner

    @flow(name="bench-local")
    def job() -> tuple[float, list[float]]:
        ctx = load_context(str(config_path), str(governance_path))
        runner = LocalRunner(ctx.config)
        started = time.perf_counter()
        fingerprints = runner.preprocess(list(SITES))
        startup = time.perf_counter() - started
        return startup, _rounds(runner, ctx.config, fingerprints, side_by_side=False)

    return job()


def _pool(config_path: Path, governance_path: Path) -> tuple[float, list[float]]:
    from quorum.flows.context import load_context
    from quorum.flows.runners.pool import PoolRunner

    ctx = load_context(str(config_path), str(governance_path), "bench-pool-job")
    runner = PoolRunner(ctx, str(config_path))
    started = time.perf_counter()
    runner.start(list(SITES))
    fingerprints = runner.preprocess(list(SITES))
    startup = time.perf_counter() - started
    overheads = _rounds(runner, ctx.config, fingerprints, side_by_side=True)
    runner.close()
    return startup, overheads


def _with_stack(config_path: Path, governance_path: Path) -> tuple[tuple[float, list[float]], ...]:
    """One real Prefect server for both runners (Prefect binds its API address at first import)."""
    from quorum.configs.schema import load_federation
    from quorum.infra.deployments import render, write
    from quorum.infra.stack import Stack, deploy
    from quorum.lineage.state import StateLayout

    config = load_federation(config_path)
    state = StateLayout(config.state_dir).ensure()
    stack = Stack(config, state)
    os.environ["PREFECT_API_URL"] = stack.prefect_url
    os.environ["MLFLOW_TRACKING_URI"] = state.tracking_uri
    try:
        stack.start_servers()
        pools = stack.ensure_pools()
        write(render(config, governance_path, WORK, []), WORK / "prefect.yaml")
        deploy(WORK / "prefect.yaml", WORK, stack.base_env())
        stack.start_workers(WORK)
        stack.wait_for_workers(pools, timeout_s=120)
        return _pool(config_path, governance_path), _local(config_path, governance_path)
    finally:
        stack.stop()


def main() -> None:
    from tests.federation import write_federation, write_governance

    deployment = {"prefect_port": _free_port(), "mlflow_port": _free_port(), "round_deadline_s": 60}
    config_path = write_federation(WORK, SITES, rounds=ROUNDS, min_sites=4, extra={"deployment": deployment})
    governance_path, _ = write_governance(WORK)
    (pool_start, pool), (local_start, local) = _with_stack(config_path, governance_path)
    local_median, pool_median = statistics.median(local), statistics.median(pool)
    print(f"workload: {len(SITES)} sites, {ROUNDS} rounds, MLP 15-8-1 on the synthetic churn data")
    print(
        f"in-process: job start-up {local_start:6.2f} s, per-round overhead median {local_median:.3f} s "
        f"(max {max(local):.3f} s)"
    )
    print(
        f"pool:       job start-up {pool_start:6.2f} s, per-round overhead median {pool_median:.3f} s "
        f"(max {max(pool):.3f} s)"
    )
    print(
        f"ratio pool/in-process: per-round overhead {pool_median / local_median:.1f}x, "
        f"start-up {pool_start / local_start:.1f}x"
    )
    print(f"target: pool median per-round overhead under 1.0 s -> {'met' if pool_median < 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
