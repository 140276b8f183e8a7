"""Loopback ports and servers for tests that speak real HTTP (and a real Redis), and waiting
for them."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

REDIS = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port free now on every address (so on any loopback address too); the OS picks it."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `check` until it is true; a connection refused or cut counts as not yet. An
    AssertionError from `check` (the server died) fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.TransportError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(interval)


def wait_ready(url: str, timeout: float, alive=lambda: None, path: str = "/readyz", interval: float = 0.3) -> None:
    """Until GET url+path answers 200; `alive()`, called before each try, fails the test with the
    server's output when it has exited."""
    def ready() -> bool:
        alive()
        return httpx.get(url + path, timeout=2).status_code == 200
    wait_until(ready, timeout, f"{url}{path} answering 200", interval)


def stop(proc: subprocess.Popen | None, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited `grace` seconds later."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def redis_server(workdir, *flags: str):
    """A real redis-server on a free loopback port that keeps nothing on disk: (its URL, its process)."""
    if REDIS is None:
        pytest.fail("redis-server is not installed (scripts/system-deps.sh installs it)")
    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), *flags], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() is None, 10,
                   "redis-server started", interval=0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.send_signal(signal.SIGCONT)  # a test may have paused it
        stop(proc)


class LiveServer:
    """uvicorn serving an app on a loopback port, in a thread of the test process."""

    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def raw_request(port: int, path: str, body: bytes) -> socket.socket:
    """Send a request on a plain socket and leave it open; closing the socket is a client disconnect."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock
