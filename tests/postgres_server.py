"""A throw-away PostgreSQL cluster on a free 127.0.0.1 port, for the integration tests.

It uses the Debian server binaries (``apt-get install postgresql``; `.ci/run` installs them) and
never the machine's own cluster: a fresh data folder in a temp dir, trust authentication on
loopback only, and ``pg_ctl stop`` at the end. PostgreSQL refuses to run as root, so under root the
cluster belongs to the ``postgres`` system user the Debian package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port

REQUIRE_ENV = "QUORUM_REQUIRE_POSTGRES"  # set by .ci/run: a missing server fails instead of skipping
USER = "quorum"


@dataclass(frozen=True)
class Postgres:
    port: int

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"


def _bin_dir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _as_owner(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def postgres_cluster(databases: tuple[str, ...]) -> Iterator[Postgres]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        message = "PostgreSQL server binaries not found (apt-get install postgresql)"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message)
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="quorum-pg-"))
    base.chmod(0o755)  # the postgres user must reach its data folder inside
    data, sockets = base / "data", base / "sockets"
    for folder in (data, sockets):
        folder.mkdir()
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    log = base / "server.log"
    log.touch()
    if os.geteuid() == 0:
        shutil.chown(log, "postgres", "postgres")
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run(
        _as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"]), **run
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off"
    subprocess.run(
        _as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"]), **run
    )
    try:
        for database in databases:
            subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, database], **run)
        yield Postgres(port)
    finally:
        subprocess.run(
            _as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            check=False,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)
