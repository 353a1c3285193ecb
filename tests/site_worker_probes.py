"""Work sent to site worker processes by tests/test_site_workers.py.

A worker unpickles a function by importing its module, so these live apart from the test module,
whose own imports (Prefect, the test harness) would otherwise load in the worker and hide what the
worker itself imports.
"""

from __future__ import annotations

import os
import sys

from quorum.configs.errors import SiteDataError

WATCHED = ("prefect", "mlflow", "great_expectations", "torch")


def loaded_frameworks(_site_id: str) -> dict[str, bool]:
    """Which of the watched frameworks this process has imported."""
    return {name: name in sys.modules for name in WATCHED}


def refuse(site_id: str) -> str:
    raise SiteDataError(f"site {site_id}: no rows", fix="add rows")


def echo(site_id: str) -> tuple[str, int]:
    return site_id, os.getpid()


def die(_site_id: str) -> None:
    os._exit(3)  # the process ends at once, as after an out-of-memory kill
