"""A site flow run's process: ``python -m quorum.infra.start_run``, the command of every site deployment.

A process worker starts a new Python process for each flow run, and ``python -m prefect.engine``
then imports Prefect, Quorum's site code, Great Expectations and torch: 8-12 s of CPU each, paid by
every site at the start of every job. ``quorum up`` therefore also starts the site run starter
(``quorum.infra.run_starter``), which has imported all of that once. This command, which imports
only the standard library, hands the run to it: the starter forks a process that already holds
those modules, gives it this process's standard streams, working folder and environment (the
site's own, as the worker composed it), and that process runs the flow run exactly as
``python -m prefect.engine`` would. This process stays as the worker's handle on the run: it
forwards SIGTERM and SIGINT to the run and exits with the run's exit status.

When no starter answers (``QUORUM_RUN_STARTER`` unset, nothing listening, a peer of another user,
or the starter stopping before it forked), this process becomes ``python -m prefect.engine`` itself,
so a site run never depends on the starter being up.

The framing shared with the starter lives here so that this module stays standard-library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

STARTER_ENV = "QUORUM_RUN_STARTER"  # the starter's socket path, set in a site worker's environment
ENGINE = ("-m", "prefect.engine")
_LENGTH = struct.Struct(">I")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(state_root: Path) -> Path:
    """Where the starter of the stack kept in ``state_root`` listens.

    Under the temporary folder rather than the state folder: a Unix socket path is limited to 107
    bytes, and a folder private to this user (``run_starter`` checks it) keeps it out of others' reach.
    """
    digest = hashlib.sha256(str(state_root.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"quorum-{os.getuid()}" / f"starter-{digest}.sock"


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def receive(sock: socket.socket) -> dict[str, Any] | None:
    """One message, or ``None`` when the peer closed the connection first."""
    header = _exactly(sock, _LENGTH.size)
    if header is None:
        return None
    data = _exactly(sock, _LENGTH.unpack(header)[0])
    if data is None:
        return None
    message = json.loads(data)
    return message if isinstance(message, dict) else None


def same_user(sock: socket.socket) -> bool:
    """Whether the process at the other end of ``sock`` runs as this user (Linux's SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return False
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size))
    return bool(uid == os.getuid())


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    if not same_user(sock):
        print(f"warning: {path} is not this user's run starter; starting the run in a new process", file=sys.stderr)
        sock.close()
        return None
    return sock


def _engine() -> None:
    """Become ``python -m prefect.engine`` with this process's arguments (never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *ENGINE, *sys.argv[1:]])


def _handed_over(sock: socket.socket) -> int | None:
    """Give the starter this run; the forked process's pid, or ``None`` if the starter stopped first."""
    try:
        socket.send_fds(sock, [b"R"], [0, 1, 2])
        send(sock, {"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:]})
        started = receive(sock)
    except OSError:
        return None
    return int(started["pid"]) if started and "pid" in started else None


def _forward_signals(pid: int) -> None:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)


def _exit_as(code: int) -> int:
    """Exit as the run did: with its code, or killed by the same signal."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code if code >= 0 else 128 - code


def main() -> int:
    path = os.environ.get(STARTER_ENV)
    sock = _connect(path) if path else None
    if sock is None:
        _engine()
        return 1
    with sock:
        pid = _handed_over(sock)
        if pid is None:
            _engine()
            return 1
        _forward_signals(pid)
        try:
            ended = receive(sock)
        except OSError:
            ended = None
    if ended is None or "exit" not in ended:
        print(
            f"error: the run starter stopped while flow run process {pid} ran\n"
            "fix: see the site-starter log in the state folder's services/, then start the run again",
            file=sys.stderr,
        )
        return 1
    return _exit_as(int(ended["exit"]))


if __name__ == "__main__":
    sys.exit(main())
