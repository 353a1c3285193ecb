"""A real S3 endpoint for tests - moto's server in a subprocess on 127.0.0.1 - and a TCP proxy in front
of it that can drop every connection for a while, so a test can take the endpoint away mid-operation.

Import the fixtures into a test module (``from tests.s3_server import s3_endpoint, bucket, flaky_proxy``):
each module gets its own server, each test its own bucket, and the AWS variables point at dummy
credentials and empty config files, so nothing reads the user's ``~/.aws`` or reaches real AWS.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.ports import free_port

_START_TIMEOUT_S = 60.0


def dummy_aws_env(folder: Path) -> dict[str, str]:
    """Variables that make boto3 use fake credentials and never read ``~/.aws`` or instance metadata."""
    (folder / "credentials").write_text("")
    (folder / "config").write_text("")
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "credentials"),
        "AWS_CONFIG_FILE": str(folder / "config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@contextmanager
def moto_server(settings: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``moto.server`` on a free port; yield its endpoint URL; stop it (by its own pid) afterwards.

    ``settings`` are extra environment variables for the server, e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=0``
    to make it check credentials (then it knows none, so every request is refused).
    """
    with tempfile.TemporaryFile() as log:
        for _ in range(3):  # the free port can be taken between probing and binding
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(settings or {})},
            )
            if _wait_for_port(port, process):
                break
            process.kill()
            process.wait()
        else:
            log.seek(0)
            raise RuntimeError(f"moto server did not start:\n{log.read().decode(errors='replace')[-2000:]}")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def raw_client(endpoint: str) -> Any:
    """A plain boto3 client, for arranging what the store under test must cope with."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


class FlakyProxy:
    """Forwards a free 127.0.0.1 port to the S3 server. While down it resets every connection - the
    open ones and each new one - the way a restarting endpoint or a broken network link does."""

    def __init__(self, target: str) -> None:
        self._target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._down_until = 0.0  # time.monotonic() value; inf while down() lasts
        self._trip: tuple[int, float] | None = None  # (bytes still to forward, outage seconds)
        self._open: set[socket.socket] = set()
        self.refused = 0  # connections reset by an outage: proof a test's outage was really met
        self._closed = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def down(self) -> None:
        self._start_outage(float("inf"))

    def up(self) -> None:
        with self._lock:
            self._down_until = 0.0

    def outage(self, seconds: float, *, after_bytes: int = 0) -> None:
        """Go down for ``seconds`` now, or once ``after_bytes`` more bytes have passed (mid-transfer)."""
        if after_bytes:
            with self._lock:
                self._trip = (after_bytes, seconds)
        else:
            self._start_outage(seconds)

    def close(self) -> None:
        self._closed.set()
        self._start_outage(float("inf"))
        self._listener.close()

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _is_down(self) -> bool:
        with self._lock:
            return time.monotonic() < self._down_until

    def _start_outage(self, seconds: float) -> None:
        with self._lock:
            self._trip = None
            self._down_until = time.monotonic() + seconds
            doomed, self._open = self._open, set()
            self.refused += len(doomed) // 2  # each relayed connection is a client and an upstream socket
        for sock in doomed:
            _reset(sock)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._is_down():
                with self._lock:
                    self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _reset(client)
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy one direction; pass an orderly close on as a half-close, anything else as a reset of both."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                self._count(len(data))
            sink.shutdown(socket.SHUT_WR)
        except OSError:  # an outage reset the pair, or the peer did
            _reset(source)
            _reset(sink)

    def _count(self, forwarded: int) -> None:
        with self._lock:
            if self._trip is None:
                return
            remaining, seconds = self._trip
            self._trip = (remaining - forwarded, seconds)
        if remaining - forwarded <= 0:
            self._start_outage(seconds)


def _reset(sock: socket.socket) -> None:
    """Abort with RST rather than a polite FIN, and wake any thread blocked reading the socket."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One moto server per test module, with the process's AWS variables pointed at dummies meanwhile."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in dummy_aws_env(tmp_path_factory.mktemp("aws")).items():
            patch.setenv(name, value)
        for name in _UNSET:
            patch.delenv(name, raising=False)
        with moto_server() as endpoint:
            yield endpoint


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh bucket per test, so tests sharing the module's server never see each other's objects."""
    name = f"quorum-test-{uuid.uuid4().hex[:12]}"
    raw_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def flaky_proxy(s3_endpoint: str) -> Iterator[FlakyProxy]:
    with FlakyProxy(s3_endpoint) as proxy:
        yield proxy
