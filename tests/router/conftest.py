"""The real router on loopback: haproxy (Debian's binary) running the config
that chatstream_operator.router renders, in front of three real
`chatstream serve` processes ("pods") sharing a real Redis session store.

The only difference from the cluster is the server list: explicit loopback
addresses here, DNS `server-template` slots there (same file otherwise)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from chatstream_operator import router

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
REDIS = shutil.which("redis-server")
ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx.TransportError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.1)


class Pod:
    """One `chatstream serve` process, as a pod runs it (env settings)."""

    def __init__(self, name: str, redis_url: str, log_dir: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url, self.log = redis_url, log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'service'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "CHATSTREAM_HOST": "127.0.0.1", "CHATSTREAM_PORT": str(self.port),
               "CHATSTREAM_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS), "CHATSTREAM_MAX_CONCURRENT": "4",
               "CHATSTREAM_THREADS": "1", "CHATSTREAM_SESSION_STORE": "redis",
               "CHATSTREAM_REDIS_URL": self.redis_url, "CHATSTREAM_SESSION_SECRET": "router-test-secret",
               "CHATSTREAM_SHUTDOWN_GRACE_SECONDS": "0", "CHATSTREAM_TEMPERATURE": "0"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "chatstream", "serve"], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        def ready():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
        wait_until(ready, timeout, f"{self.name} became ready")

    def kill(self) -> None:
        """SIGKILL: the pod vanishes mid-life, as a node failure would have it."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def outcomes(self) -> dict[str, float]:
        """chatstream_outcomes_total by outcome, from the pod's /metrics."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("chatstream_outcomes_total{"):
                label, value = line.rsplit(" ", 1)
                out[label.split('"')[1]] = float(value)
        return out


class Router:
    """haproxy in the foreground on the rendered config."""

    def __init__(self, pods: list[Pod], workdir: Path, affinity: bool = True):
        self.pods = {p.name: p for p in pods}
        self.port, self.monitor = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = str(workdir / f"haproxy-{self.port}.sock")
        self.config = router.haproxy_config(
            "test", "default", servers=[(p.name, f"127.0.0.1:{p.port}") for p in pods],
            bind=f"127.0.0.1:{self.port}", monitor_bind=f"127.0.0.1:{self.monitor}",
            health_interval="500ms", affinity=affinity, stats_socket=self.socket)
        self.cfg = workdir / f"haproxy-{self.port}.cfg"
        self.cfg.write_text(self.config)
        self.log = workdir / f"haproxy-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(self.cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.servers_up() == set(self.pods), 30, "haproxy saw every pod up")
        return self

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.socket)
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers_up(self) -> set[str]:
        up = set()
        for line in self.admin("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "pods" and fields[1] in self.pods and fields[17].startswith("UP"):
                up.add(fields[1])
        return up

    def table(self) -> dict[str, str]:
        """The stick table: key -> server name."""
        out = {}
        for line in self.admin("show table pods").splitlines():
            if " key=" in line:
                attrs = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                out[attrs["key"]] = attrs.get("server_key") or attrs.get("server_name", "")
        return out


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if REDIS is None:
        pytest.fail("redis-server is not installed (scripts/system-deps.sh installs it)")
    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL)
    wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=0.2).close() is None, 10,
               "redis-server started")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def pods(redis_url, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pods")
    started = [Pod(f"pod{i}", redis_url, logs) for i in (1, 2, 3)]
    try:
        for pod in started:
            pod.start()
        for pod in started:
            pod.wait_ready()
        yield started
    finally:
        for pod in started:
            if pod.proc and pod.proc.poll() is None:
                pod.proc.terminate()
                try:
                    pod.proc.wait(15)
                except subprocess.TimeoutExpired:
                    pod.kill()


@pytest.fixture(scope="module")
def proxy(pods, tmp_path_factory):
    if HAPROXY is None:
        pytest.fail("haproxy is not installed (scripts/system-deps.sh installs it)")
    with Router(pods, tmp_path_factory.mktemp("router")) as r:
        yield r


@pytest.fixture(scope="module")
def plain_proxy(pods, tmp_path_factory):
    """The same config without its stick rules: the control that shows the
    affinity assertions can fail."""
    if HAPROXY is None:
        pytest.fail("haproxy is not installed (scripts/system-deps.sh installs it)")
    with Router(pods, tmp_path_factory.mktemp("plain"), affinity=False) as r:
        yield r
