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


# session fixtures built once for every test process (tests/built_once.py); the files using them are ordered
# so that one builds while the other process runs other files, and the rest find it built
BUILT_ONCE = frozenset({"governed_history"})


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist hands out files (--dist loadfile) sorted by their number of tests unless told not to,
    # which puts the few-test whole-lifecycle files last, as one process's long tail while the other
    # idles; keep the order run_order() gives instead
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    config.pluginmanager.register(FileOrder(), "quorum-file-order")


def run_order(files: list[tuple[str, set[str]]]) -> list[str]:
    """Test files (path, fixtures their tests use) in the order to hand them out: the slow ones first.

    Flow-tier files (a Prefect API, often a whole lifecycle) take longest, so they start first and the
    quick unit files fill both processes' last minutes. Of the files sharing a fixture from ``BUILT_ONCE``,
    one leads, to start the build early; the others follow the rest of the flow tier, when it is built,
    instead of waiting on it in the other process.
    """
    leaders: set[str] = set()
    shared_first: set[str] = set()
    for path, fixtures in files:
        shared = fixtures & BUILT_ONCE
        if shared and not shared <= shared_first:
            leaders.add(path)
            shared_first |= shared

    def rank(entry: tuple[int, tuple[str, set[str]]]) -> tuple[int, int]:
        index, (path, fixtures) = entry
        if path in leaders:
            return 0, index
        if fixtures & BUILT_ONCE:
            return 2, index
        return (1 if "prefect_harness" in fixtures else 3), index

    return [path for _, (path, _) in sorted(enumerate(files), key=rank)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marked = {mark.name for mark in item.iter_markers()}
        fixtures = set(getattr(item, "fixturenames", ()))
        chosen = tier(marked, fixtures)
        if chosen not in marked:
            item.add_marker(chosen)


class FileOrder:
    """Puts the collected files in ``run_order``; a plugin of its own so that it runs last, after ``-m`` has
    deselected by the tiers ``pytest_collection_modifyitems`` above marked."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        by_file: dict[str, set[str]] = {}
        for item in items:
            by_file.setdefault(item.nodeid.split("::")[0], set()).update(getattr(item, "fixturenames", ()))
        position = {path: index for index, path in enumerate(run_order(list(by_file.items())))}
        items.sort(key=lambda item: position[item.nodeid.split("::")[0]])  # stable: each file keeps its order


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

    The governance, trust and serving tests each copy it (their ``world`` fixtures). The two lifecycles
    run once per session, in whichever test process asks first (``tests.built_once``), not once per
    process or module: they are the most expensive fixture of the flow tier.
    """
    from tests.built_once import built_once

    return built_once(tmp_path_factory, "governed", _build_governed_history)


def _build_governed_history(root: Path) -> None:
    from quorum.flows.lifecycle import lifecycle
    from quorum.lineage.keys import generate_key_pair
    from tests.federation import pin_governance_root, write_federation, write_governance

    config_path = write_federation(root, rounds=2)
    governance_path, keys = write_governance(root)
    pin_governance_root(config_path, governance_path)
    generate_key_pair(root / "keys" / "mallory.key", root / "keys" / "mallory.pub")
    first = lifecycle(str(config_path), str(governance_path), keys[:2])
    second = lifecycle(str(config_path), str(governance_path), keys[:1])
    assert first.promotion is not None and first.promotion.champion
    assert second.promotion is not None and not second.promotion.champion
