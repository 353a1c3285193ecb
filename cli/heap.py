"""Keep Python's cyclic garbage collector off what a command imported.

A ``quorum run`` imports Prefect, MLflow, pandas, torch and Great Expectations: millions of objects that
live until the process ends. CPython's collector walks all of them on every full collection (about ten
in one run, each a fraction of a second; seconds in all on a busy 2-core machine) and once more while
the interpreter shuts down, only to free memory the operating system takes back at exit. ``gc.freeze()``
moves the objects that exist at that moment out of the collector's reach; reference counting still frees
everything as usual, and objects made afterwards are collected as before.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def imports_frozen() -> Iterator[None]:
    """During the block, full collections skip what existed at its start (the command's imports).

    Scoped rather than left on: tests call the commands in one long process, where a freeze that is never
    undone would also keep every earlier test's unreachable cycles.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def freeze_for_exit() -> None:
    """Spare the interpreter's shutdown its collections over everything imported: call it last, just before
    the process exits (atexit handlers, module teardown and reference counting still run as usual)."""
    gc.freeze()
