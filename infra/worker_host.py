"""Start many Prefect process workers for the price of one import: ``python -m quorum.infra.worker_host``.

``prefect worker start`` imports Prefect in every worker process: about 2.5 s of CPU each, which for
the nine workers of an 8-site ``quorum up`` was 20-25 s of CPU on a 2-core machine. This host imports
Prefect's process worker once, waits until the Prefect API answers, then forks one worker per line
it reads on stdin. Each forked worker is a process of its own, exactly as before: its own session and
process group (``quorum down`` and a test can stop one site's worker alone), its own log, its own
working folder, and the host's environment (the one every worker shares, with no site's data and no
credentials) plus what its line adds, so a site worker's flow runs start with only that site's data root
and credentials file.

Lines are read from the raw file descriptor one byte at a time, after the previous worker was forked:
a worker forked earlier never holds a later line in memory, so site workers (sent first) never see the
coordinator's credentials (sent last). The host exits once every worker runs; it prints one
``started POOL PID`` line per worker and writes each pid to the line's ``pid_file``.

This module imports only the standard library and Prefect, never Quorum's flows or a site's code.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
import urllib.request
from typing import Any

API_WAIT_POLL_S = 0.25


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, read byte by byte so nothing after it is buffered in this process."""
    line = bytearray()
    while True:
        byte = os.read(fd, 1)
        if not byte or byte == b"\n":
            return bytes(line)
        line += byte


def _wait_for_api(health_url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(API_WAIT_POLL_S)
    return False


async def _run_worker(pool: str, heartbeat_s: int) -> None:
    from prefect.settings import PREFECT_WORKER_PREFETCH_SECONDS
    from prefect.utilities.processutils import setup_signal_handlers_worker
    from prefect.workers.process import ProcessWorker

    # as `prefect worker start` does: the first SIGTERM stops polling, a second one kills
    setup_signal_handlers_worker(os.getpid(), f"the worker of pool {pool}", print)
    worker = ProcessWorker(
        work_pool_name=pool,
        heartbeat_interval_seconds=heartbeat_s,
        prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
    )
    await worker.start(printer=print)


def _become_worker(spec: dict[str, Any]) -> None:
    """In the forked child: detach, take the worker's log, folder and environment, and run it."""
    code = 0
    try:
        os.setsid()
        log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        os.chdir(spec["cwd"])
        os.environ.update(spec["env"])  # this process already runs with the base environment every worker shares
        asyncio.run(_run_worker(spec["pool"], int(spec["heartbeat_s"])))
    except KeyboardInterrupt:  # the signal handlers turn a first SIGTERM into SIGINT
        pass
    except BaseException:  # the worker's log is the only place left to say why it stopped
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> int:
    header = json.loads(_read_line(0))
    # imported once, here: every worker forked below shares these modules instead of importing them again
    import prefect.utilities.processutils
    import prefect.workers.process

    del prefect  # only loaded here; each worker uses them after the fork

    if not _wait_for_api(str(header["health_url"]), float(header["timeout_s"])):
        print(
            f"error: the Prefect API at {header['health_url']} did not answer within {header['timeout_s']:.0f}s\n"
            "fix: see the Prefect server's log, then run `quorum up` again",
            file=sys.stderr,
        )
        return 3
    while raw := _read_line(0):
        spec = json.loads(raw)
        pid = os.fork()
        if pid == 0:
            _become_worker(spec)
        with open(spec["pid_file"], "w") as pid_file:
            pid_file.write(str(pid))
        print(f"started {spec['pool']} {pid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
