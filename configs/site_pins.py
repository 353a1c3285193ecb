"""The federation config and governance a site worker was started with, pinned in its environment.

A site flow run gets ``config_path`` and ``governance_path`` as parameters, and those live in the
Prefect database, which an attacker who writes the coordinator's state folder can rewrite. Pointed at a
forged governance, a site that has never deployed would trust the forger's keys (a site that has
deployed refuses: its recorded root no longer matches); pointed at a forged config, it would run the
forger's contract and PII columns on its own raw data. So whoever starts a site's worker (``quorum up``,
``quorum worker``) pins the two files it means in the worker's environment, which flow runs inherit
and the database cannot touch, and every site flow refuses parameters that name other files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from quorum.configs.errors import ConfigError

CONFIG_PIN_ENV = "QUORUM_SITE_CONFIG"
GOVERNANCE_PIN_ENV = "QUORUM_SITE_GOVERNANCE"


def site_pins(config_path: Path | str, governance_path: Path | str) -> dict[str, str]:
    """The environment entries that pin a site worker to these two files (absolute, links resolved)."""
    return {CONFIG_PIN_ENV: str(Path(config_path).resolve()), GOVERNANCE_PIN_ENV: str(Path(governance_path).resolve())}


def require_pinned(
    config_path: Path | str, governance_path: Path | str | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Refuse a flow run whose config or governance is not the file this worker was started with.

    No pin, no check: a site flow called in-process, or by a worker started without Quorum, has no
    parameters from a database to distrust.
    """
    env = os.environ if env is None else env
    wanted = [(CONFIG_PIN_ENV, "federation config", "--config", config_path)]
    if governance_path is not None:
        wanted.append((GOVERNANCE_PIN_ENV, "governance", "--governance", governance_path))
    for name, what, option, given in wanted:
        pinned = env.get(name)
        if pinned and Path(given).resolve() != Path(pinned).resolve():
            raise ConfigError(
                f"this site's worker was started for the {what} {pinned}, but the flow run names {given}",
                fix="the run's parameters come from the Prefect database: deploy again from the project "
                f"(`quorum up`), or, if {given} is the right file, restart this site's worker with {option} {given}",
            )
