"""Shared fixtures. Prefect and MLflow are pointed at a throw-away folder before either is imported,
so no test touches the user's home, a running server or the repository's own state."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="quorum-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[Path]:
    """One temporary Prefect API for the session's flow tests; yields its home folder."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield _SESSION_HOME / "prefect"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models train 10-30x faster on one thread when the machine is busy (no spinning thread pool)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
