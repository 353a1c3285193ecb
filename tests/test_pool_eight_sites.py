"""Eight sites on their own pools while two CPU-bound processes compete for the machine.

`quorum up` as a user runs it (servers on free loopback ports), then `quorum run --runner pool`:
every site must take part in every round (no site lost to a deadline while it was only slow) and
the verdict must record the coverage gate. The CPU burners stop by themselves after a bounded time
and are killed at the end in any case; `quorum down` stops everything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from quorum.configs.schema import load_federation
from quorum.lineage.state import StateLayout
from tests.federation import POOL_GATES, write_federation, write_governance
from tests.ports import free_port

pytestmark = pytest.mark.integration
QUORUM = str(Path(sys.executable).with_name("quorum"))
SITES = tuple(f"s{i}" for i in range(1, 9))
BURN_S = 2400  # a burner ends on its own after this, even if the test process dies


def _env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**clean, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture
def burners() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two processes that keep a core busy each, bounded in time, killed at the end."""
    loop = f"import time\nend = time.monotonic() + {BURN_S}\nwhile time.monotonic() < end:\n    pass\n"
    processes = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(2)]
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)


def test_eight_sites_under_cpu_load_lose_no_site_and_record_the_coverage_gate(
    tmp_path: Path, burners: list[subprocess.Popen[bytes]]
) -> None:
    deployment = {"prefect_port": free_port(), "mlflow_port": free_port()}  # default deadlines and allowance
    config_path = write_federation(
        tmp_path, SITES, rounds=3, min_sites=len(SITES), gates=POOL_GATES, extra={"deployment": deployment}
    )
    governance, keys = write_governance(tmp_path)
    config = load_federation(config_path)
    base = ["--config", str(config_path)]
    up = subprocess.run(
        [QUORUM, "up", *base, "--governance", str(governance)], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        command = [QUORUM, "run", "--runner", "pool", *base, "--governance", str(governance), "--job-id", "eight"]
        run = subprocess.run(
            [*command, "--approve-with", keys[0], "--approve-with", keys[1]],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        subprocess.run([QUORUM, "down", *base], cwd=tmp_path, env=_env(), capture_output=True, timeout=300)

    state = StateLayout(config.state_dir)
    job = state.artifacts / "jobs" / "eight"
    manifests = [json.loads((job / "rounds" / f"{r:04d}" / "manifest.json").read_text()) for r in (1, 2, 3)]
    verdicts = [
        json.loads(line)["details"]
        for line in state.audit_log.read_text().splitlines()
        if json.loads(line)["event"] == "gate_verdict"
    ]
    assert all(burner.poll() is None for burner in burners)  # the load lasted the whole job
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads((job / "job.json").read_text())["excluded"] == {}
    assert [sorted(m["sites"]) for m in manifests] == [list(SITES)] * 3
    [verdict] = verdicts
    [coverage] = [gate for gate in verdict["gates"] if gate["name"] == "site_coverage"]
    assert coverage["passed"] and coverage["value"] == 1.0 and coverage["bound"] == 0.75
    assert verdict["excluded_sites"] == {}
