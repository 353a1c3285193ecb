"""The first `quorum run` of a new federation passes while two CPU-bound processes compete for the cores.

A real CLI in a fresh state folder: it creates its Prefect database and says so, starts its temporary
Prefect API beside its own imports, and must finish (exit 0) instead of timing out on a busy machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.federation import write_federation, write_governance

BURN_S = 900  # each CPU burner stops by itself after this, even if the test is killed
_BURN = f"import time\nend = time.monotonic() + {BURN_S}\nwhile time.monotonic() < end:\n    pass\n"


@pytest.fixture
def busy_machine() -> Iterator[None]:
    burners = [subprocess.Popen([sys.executable, "-c", _BURN]) for _ in range(2)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


@pytest.mark.integration
def test_first_run_under_load_prepares_its_database_and_passes(tmp_path: Path, busy_machine: None) -> None:
    config = write_federation(tmp_path, ("alpha", "beta"), rounds=1)
    governance, keys = write_governance(tmp_path, ("ann", "ben"), quorum=2)
    state = tmp_path / "state"
    assert not (state / "prefect").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # PREFECT_HOME unset: the state folder's own is used
    command = [str(Path(sys.executable).with_name("quorum")), "run", "--config", str(config)]
    command += ["--governance", str(governance), "--approve-with", keys[0], "--approve-with", keys[1]]

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800, check=False)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "preparing its local Prefect database" in done.stdout
    assert "Traceback" not in done.stderr
    assert (state / "prefect" / "prefect.db").is_file()
    assert "champion: test-model version 1" in done.stdout
