"""The site run starter's own checks, without a Prefect server: where it listens and whom it serves."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from quorum.infra.run_starter import StarterError, listen
from quorum.infra.start_run import receive, same_user, send, socket_path


def test_the_socket_path_stays_short_and_private_whatever_the_state_folder(tmp_path: Path) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8)

    path = socket_path(deep)

    assert len(str(path).encode()) < 104  # AF_UNIX paths end at 107 bytes on Linux, fewer elsewhere
    assert path != socket_path(tmp_path) and path == socket_path(deep)
    assert path.parent.name == f"quorum-{os.getuid()}"


@pytest.mark.parametrize("mode", [0o777, 0o750, 0o705])
def test_a_folder_others_can_enter_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)

    with pytest.raises(StarterError, match="not a folder private to this user"):
        listen(shared / "starter.sock")

    assert not (shared / "starter.sock").exists()


def test_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)

    with pytest.raises(StarterError):
        listen(link / "starter.sock")


def test_messages_round_trip_between_processes_of_the_same_user(tmp_path: Path) -> None:
    listener = listen(tmp_path / "private" / "starter.sock")
    got: dict[str, object] = {}

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            got["peer_is_same_user"] = same_user(conn)
            got["message"] = receive(conn)
            send(conn, {"pid": 42})

    server = threading.Thread(target=answer)
    server.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(tmp_path / "private" / "starter.sock"))
        send(client, {"env": {"A": "1" * 70_000}, "cwd": "/"})
        reply = receive(client)
        assert receive(client) is None  # the server closed: no message, no error
    server.join(timeout=10)
    listener.close()

    assert reply == {"pid": 42}
    assert got == {"peer_is_same_user": True, "message": {"env": {"A": "1" * 70_000}, "cwd": "/"}}
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
