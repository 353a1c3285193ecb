"""The collector is kept off a command's imports only while its job runs, and for good only at process exit."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from quorum.cli.heap import imports_frozen
from quorum.cli.main import main

pytestmark = pytest.mark.unit


def test_imports_frozen_holds_what_exists_and_lets_go_after() -> None:
    # Arrange
    gc.unfreeze()

    # Act
    with imports_frozen():
        held = gc.get_freeze_count()

    # Assert
    assert held > 0
    assert gc.get_freeze_count() == 0


def test_imports_frozen_lets_go_when_the_job_fails() -> None:
    # Arrange
    gc.unfreeze()

    # Act
    with pytest.raises(RuntimeError), imports_frozen():
        raise RuntimeError("the job failed")

    # Assert
    assert gc.get_freeze_count() == 0


def test_console_exits_with_mains_code_and_its_message(tmp_path: Path) -> None:
    # Arrange: a command that fails in a known way, so ``main`` returns (rather than argparse exiting)
    argv = ["run", "--config", str(tmp_path / "missing.yaml")]
    expected = main(argv)

    # Act: the installed script's function, in a process of its own (it freezes the heap for exit)
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from quorum.cli.main import console; sys.exit(console())", *argv],
        capture_output=True,
        text=True,
        check=False,
    )

    # Assert
    assert expected != 0
    assert done.returncode == expected, done.stderr
    assert "missing.yaml" in done.stderr
