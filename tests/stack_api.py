"""Pointing a test process at a stack ``quorum up`` would start, and putting everything back after."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, temporary_settings

from quorum.infra.stack import Stack


@contextmanager
def using_stack(stack: Stack) -> Iterator[Stack]:
    """Flows and clients of this process talk to ``stack``'s Prefect API inside the block; the stack is
    stopped when it ends. Prefect's settings are overridden too: an earlier module's session harness in
    the same process overrides the environment in-process."""
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = stack.prefect_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: stack.prefect_url}):
            try:
                yield stack
            finally:
                stack.stop()
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
