"""The site run starter: ``python -m quorum.infra.run_starter SOCKET``, started by ``quorum up``.

It imports, once, what every site flow run imports (Prefect's engine, Quorum's site flows, Great
Expectations, torch), then forks one process per site flow run that ``quorum.infra.start_run``
hands it. A forked process begins with those modules loaded, where ``python -m prefect.engine``
would spend 8-12 s of CPU importing them: on a 2-core machine, eight sites starting a job at once
paid that eight times over, and sixteen sites sixteen times.

A fork copies only this process, so what a run may see is decided here:
- This process runs with the environment every worker shares: no site's data root and no
  credentials. A forked run takes its whole environment, working folder and standard streams from
  its ``start_run`` process, that is from its site's worker, so it sees exactly what a
  ``python -m prefect.engine`` started by that worker would have seen.
- Only processes of this user are served (SO_PEERCRED), and the socket sits in a folder only this
  user can enter.
- This process runs no Python thread but its main one, the condition for forking safely: it refuses
  to serve if an import started one. (The one native thread an import starts, the jemalloc
  allocator's background purger, is fork-aware: jemalloc's own fork handlers keep its locks sound.)
  It never runs a flow, touches a site's data, or opens a connection to the Prefect API itself.

A forked run belongs to this process's group, so ``quorum down`` stops the runs with their starter.
When a run's ``start_run`` process dies, the run gets SIGTERM, as if its worker had cancelled it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import runpy
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from quorum.infra.start_run import receive, same_user, send

# what a site flow run imports, in the order it does (``tests/test_run_starter.py`` holds that a
# site session finds them loaded)
PRELOAD = (
    "prefect.engine",
    "prefect.flow_engine",
    "quorum.flows.runners.site_session",
    "quorum.flows.site_flows",
    "quorum.flows.deploy",
    "great_expectations",
    "quorum.tasks.training",
)
REQUEST_TIMEOUT_S = 10.0  # a client that connects must send its request within this
REAP_EVERY_S = 0.2


class StarterError(Exception):
    """The starter cannot serve safely; clients then start their runs in new processes."""


@dataclass(frozen=True)
class RunRequest:
    """What a ``start_run`` process hands over: its streams, folder, environment and arguments."""

    fds: tuple[int, int, int]
    cwd: str
    env: dict[str, str]
    argv: list[str]


def _private_folder(folder: Path) -> None:
    """Create ``folder`` for this user alone, or refuse one another user could enter or replace."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StarterError(f"{folder} is not a folder private to this user")


def listen(path: Path) -> socket.socket:
    """Bind now, before the imports: runs handed over meanwhile wait in the backlog."""
    _private_folder(path.parent)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    return listener


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import what site runs import; the names that failed (a run then imports them, and fails, itself)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            print(f"could not preload {name}: {exc}", flush=True)
            failed.append(name)
    if threading.active_count() != 1:
        names = ", ".join(thread.name for thread in threading.enumerate())
        raise StarterError(f"an import started threads ({names}); forking would copy them half-way")
    gc.freeze()  # what was imported stays shared with every fork instead of being copied by the collector
    return failed


def _read_request(conn: socket.socket) -> RunRequest | None:
    conn.settimeout(REQUEST_TIMEOUT_S)
    try:
        if not same_user(conn):
            return None
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        message = receive(conn)
    except (OSError, ValueError):
        return None
    finally:
        conn.settimeout(None)
    if len(fds) != 3 or message is None:
        for fd in fds:
            os.close(fd)
        return None
    return RunRequest((fds[0], fds[1], fds[2]), str(message["cwd"]), dict(message["env"]), list(message["argv"]))


class Starter:
    """The accept, fork and reap loop; ``serve`` returns only in a forked run, with its request."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        self.runs: dict[int, socket.socket] = {}  # forked pid -> its start_run connection

    def serve(self) -> RunRequest:
        while True:
            for key, _ in self.selector.select(timeout=REAP_EVERY_S):
                if key.fileobj is self.listener:
                    request = self._accept()
                    if request is not None:
                        return request
                else:
                    self._client_closed(key.fileobj, key.data)  # type: ignore[arg-type]
            self._reap()

    def _accept(self) -> RunRequest | None:
        conn, _ = self.listener.accept()
        request = _read_request(conn)
        if request is None:
            conn.close()
            return None
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            self._leave()
            conn.close()
            return request
        for fd in request.fds:
            os.close(fd)
        self.runs[pid] = conn
        with contextlib.suppress(OSError):
            send(conn, {"pid": pid})
        self.selector.register(conn, selectors.EVENT_READ, pid)
        print(f"{time.strftime('%H:%M:%S')} started run {pid} in {request.cwd}", flush=True)
        return None

    def _client_closed(self, conn: socket.socket, pid: int) -> None:
        """A readable connection means its start_run process went away: stop the run it stood for."""
        self.selector.unregister(conn)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.runs.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            print(f"{time.strftime('%H:%M:%S')} run {pid} exited with {code}", flush=True)
            with contextlib.suppress(OSError):
                send(conn, {"exit": code})
            with contextlib.suppress(KeyError):  # not registered any more if its client went first
                self.selector.unregister(conn)
            conn.close()

    def _leave(self) -> None:
        """In a forked run: close the starter's sockets, so that only the starter serves them."""
        self.selector.close()
        self.listener.close()
        for conn in self.runs.values():
            conn.close()


def run(request: RunRequest) -> None:
    """Become the run: ``python -m prefect.engine`` started by the site's worker, minus the imports."""
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
    for fd in set(request.fds):
        if fd > 2:
            os.close(fd)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[0] = request.cwd  # as `python -m` sets it
    import prefect.context

    prefect.context.refresh_global_settings_context()  # the settings as this run's environment gives them
    engine = sys.modules.pop("prefect.engine")  # run as __main__, as `python -m` does, not as the loaded module
    sys.argv = [str(engine.__file__), *request.argv]
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m quorum.infra.run_starter SOCKET", file=sys.stderr)
        return 2
    path = Path(args[0])
    try:
        listener = listen(path)
        failed = preload()
    except (OSError, StarterError) as exc:
        print(f"error: the site run starter cannot serve: {exc}\nfix: site runs start in new processes meanwhile")
        return 3
    print(f"{time.strftime('%H:%M:%S')} ready on {path} (pid {os.getpid()}, {len(failed)} preloads failed)", flush=True)
    request = Starter(listener).serve()
    run(request)  # only a forked run gets here; the engine exits the process itself
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
