"""Shared fixtures and the test tiers. Prefect and MLflow are pointed at a throw-away folder before
either is imported, so no test touches the user's home, a running server or the repository's own state.

Every test lands in exactly one tier (markers registered in pyproject.toml):

- ``integration``: starts real servers or tools in their own processes (the quorum CLI, dvc, an S3
  server); marked by hand with ``@pytest.mark.integration``, or by using an S3 server fixture;
- ``flow``: runs Prefect flows against the session's temporary Prefect API (``prefect_harness``);
- ``unit``: everything else, in-process with no API.

``pytest -m "not integration"`` is the quick loop; ``pytest -m unit`` the quickest.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prefect_server import prefect_port  # noqa: F401  (a fixture: a Prefect server of the test's own)

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="quorum-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parent.parent

TIERS = ("unit", "flow", "integration")
# fixtures that start a real server in its own process: a test using one is an integration test
SERVER_FIXTURES = frozenset({"s3_endpoint", "bucket", "flaky_proxy"})


def tier(marked: set[str], fixtures: set[str]) -> str:
    """The one tier of a test: an explicit tier marker wins, then what its fixtures start."""
    explicit = [name for name in TIERS if name in marked]
    if len(explicit) > 1:
        raise pytest.UsageError(f"a test has more than one tier marker: {', '.join(explicit)}")
    if explicit:
        return explicit[0]
    if fixtures & SERVER_FIXTURES:
        return "integration"
    if "prefect_harness" in fixtures:
        return "flow"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marked = {mark.name for mark in item.iter_markers()}
        fixtures = set(getattr(item, "fixturenames", ()))
        chosen = tier(marked, fixtures)
        if chosen not in marked:
            item.add_marker(chosen)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[Path]:
    """One temporary Prefect API for the session's flow tests; yields its home folder."""
    from prefect.testing.utilities import prefect_test_harness

    # the harness starts a Prefect server process; on a loaded 2-core machine that took over 120 s
    with prefect_test_harness(server_startup_timeout=300):
        yield _SESSION_HOME / "prefect"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models train 10-30x faster on one thread when the machine is busy (no spinning thread pool)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def governed_history(tmp_path_factory: pytest.TempPathFactory, prefect_harness: Path) -> Path:
    """One real federation run twice: v1 champion (ann + ben), v2 awaiting a second approval.

    The governance, trust and serving tests each copy it (their ``world`` fixtures), so the two
    lifecycles run once per test process instead of once per module.
    """
    from quorum.flows.lifecycle import lifecycle
    from quorum.lineage.keys import generate_key_pair
    from tests.federation import pin_governance_root, write_federation, write_governance

    root = tmp_path_factory.mktemp("governed")
    config_path = write_federation(root, rounds=2)
    governance_path, keys = write_governance(root)
    pin_governance_root(config_path, governance_path)
    generate_key_pair(root / "keys" / "mallory.key", root / "keys" / "mallory.pub")
    first = lifecycle(str(config_path), str(governance_path), keys[:2])
    second = lifecycle(str(config_path), str(governance_path), keys[:1])
    assert first.promotion is not None and first.promotion.champion
    assert second.promotion is not None and not second.promotion.champion
    return root
