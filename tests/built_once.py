"""Expensive read-only test data built once per pytest session, for every xdist worker.

A session fixture is built once per test process: with ``pytest -n 2`` each worker that runs a test
needing it builds its own, and two whole-lifecycle histories cost about a minute of CPU each on the
2-core development machine. ``built_once`` follows pytest-xdist's documented pattern instead: the first
worker to ask builds the folder under the session's shared temp root (the parent of every worker's
base temp), holding a file lock; the others wait on that lock and then find it finished.

Callers must never write to the returned folder: tests take their own copy of it
(``tests.federation.private_copy``), so it stays exactly as built for every worker.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``build`` fills, built by one test process per session and shared by all of them.

    ``build`` gets an empty folder. Without xdist the folder is a plain temp dir of this process.
    A build that raised leaves no marker, so the next worker to ask removes it and builds again (and
    fails the same way, with its own traceback) instead of using a half-written history.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        root = tmp_path_factory.mktemp(name)
        build(root)
        return root
    root = tmp_path_factory.getbasetemp().parent / name
    done = root.with_name(f"{name}.built")  # written last, beside the folder so copies do not carry it
    with FileLock(root.with_name(f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build(root)
            done.touch()
    return root
