"""Helpers of the router tests. The real router on loopback: haproxy (Debian's binary) running the config
that chatstream_operator.router renders, in front of three real
`chatstream serve` processes ("pods") sharing a real Redis session store.

The only difference from the cluster is the server list: explicit loopback
addresses here, DNS `server-template` slots there (same file otherwise)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import metrics
from support.net import free_port, stop, wait_ready, wait_until

from chatstream_operator import router

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)
ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 48


def need_haproxy(dnsmasq: bool = False) -> None:
    """Fails the test (never skips it) when a program it runs is not installed."""
    if HAPROXY is None:
        pytest.fail("haproxy is not installed (scripts/system-deps.sh installs it)")
    if dnsmasq and DNSMASQ is None:
        pytest.fail("dnsmasq is not installed (scripts/system-deps.sh installs it)")


@contextlib.contextmanager
def running(*pods: "Pod"):
    """The pods started at once, each ready before the block; all stopped after it, whatever happened."""
    try:
        for pod in pods:
            pod.start()
        for pod in pods:
            pod.wait_ready()
        yield pods
    finally:
        for pod in pods:
            pod.stop()


class Pod:
    """One `chatstream serve` process, as a pod runs it (env settings)."""

    def __init__(self, name: str, host: str, port: int, redis_url: str, log_dir: Path, env: dict | None = None):
        # Each pod has its own loopback address and all share one port, as
        # pod IPs behind a headless Service do (the DNS test needs that).
        self.name, self.host, self.port = name, host, port
        self.url = f"http://{host}:{port}"
        self.redis_url, self.log = redis_url, log_dir / f"{name}.log"
        self.env = env or {}  # more settings (CHATSTREAM_*), over the ones below
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'service'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "CHATSTREAM_HOST": self.host, "CHATSTREAM_PORT": str(self.port),
               "CHATSTREAM_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS), "CHATSTREAM_MAX_CONCURRENT": "4",
               "CHATSTREAM_THREADS": "1", "CHATSTREAM_SESSION_STORE": "redis",
               "CHATSTREAM_REDIS_URL": self.redis_url, "CHATSTREAM_SESSION_SECRET": "router-test-secret",
               "CHATSTREAM_SHUTDOWN_GRACE_SECONDS": "0", "CHATSTREAM_TEMPERATURE": "0", **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "chatstream", "serve"], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        def alive():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
        wait_ready(self.url, timeout, alive, interval=0.1)

    def stop(self) -> None:
        """SIGTERM, as the kubelet stops a pod; SIGKILL if it has not exited 15 s later."""
        stop(self.proc, 15)

    def kill(self) -> None:
        """SIGKILL: the pod vanishes mid-life, as a node failure would have it."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def outcomes(self) -> dict[str, float]:
        """chatstream_outcomes_total by outcome, from the pod's /metrics."""
        return metrics.by_label(metrics.scrape(self.url, timeout=5), "chatstream_outcomes_total", "outcome")


class Router:
    """haproxy in the foreground on the rendered config."""

    def __init__(self, pods: list[Pod], workdir: Path, affinity: bool = True, nameserver: str | None = None,
                 **config):
        """nameserver: find the pods through DNS (the cluster form of the
        config: server-template slots), else list them; config: more
        arguments of router.haproxy_config (the activator's)."""
        self.pods = {p.name: p for p in pods}
        self.port, self.monitor = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = str(workdir / f"haproxy-{self.port}.sock")
        listed = None if nameserver else [(p.name, f"{p.host}:{p.port}") for p in pods]
        self.config = router.haproxy_config(
            "test", "default", servers=listed, nameservers=[nameserver] if nameserver else None,
            pod_port=pods[0].port,
            bind=f"127.0.0.1:{self.port}", monitor_bind=f"127.0.0.1:{self.monitor}",
            health_interval="500ms", affinity=affinity, stats_socket=self.socket, **config)
        if nameserver:
            # Slots have no fixed names: a pod is known by its address.
            self.pods = {}
        self.cfg = workdir / f"haproxy-{self.port}.cfg"
        self.cfg.write_text(self.config)
        self.log = workdir / f"haproxy-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(self.cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.cfg)], stdout=log, stderr=subprocess.STDOUT)
        if self.pods:
            wait_until(lambda: self.servers_up() == set(self.pods), 30, "haproxy saw every pod up")
        return self

    def __exit__(self, *exc):
        stop(self.proc)

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.socket)
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_stats(self) -> list[list[str]]:
        """The `show stat` CSV row of each server of the pods backend
        (field 5: smax, 17: status)."""
        rows = [line.split(",") for line in self.admin("show stat").splitlines()]
        return [f for f in rows if len(f) > 17 and f[0] == "pods" and f[1] not in ("FRONTEND", "BACKEND")]

    def servers_up(self) -> set[str]:
        return {f[1] for f in self.server_stats() if f[17].startswith("UP")}

    def most_in_flight(self) -> dict[str, int]:
        """Server name -> the most requests it served at once (haproxy's
        smax) since the last `clear counters`."""
        return {f[1]: int(f[5] or 0) for f in self.server_stats()}

    def addresses(self) -> dict[str, str]:
        """Server (slot) name -> the address it has now ("0.0.0.0" when empty)."""
        out = {}
        for line in self.admin("show servers state pods").splitlines()[2:]:
            fields = line.split()
            if len(fields) > 4:
                out[fields[3]] = fields[4]
        return out

    def table(self) -> dict[str, str]:
        """The stick table: key -> server name."""
        out = {}
        for line in self.admin("show table pods").splitlines():
            if " key=" in line:
                attrs = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                out[attrs["key"]] = attrs.get("server_key") or attrs.get("server_name", "")
        return out


class Dns:
    """dnsmasq answering for the pods' headless-Service name from a hosts
    file: what cluster DNS does for ready pods. Editing the file and sending
    SIGHUP is a pod leaving (or joining) the Service's endpoints."""

    NAME = "test-pods.default.svc.cluster.local"

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.hosts = workdir / "hosts"
        self.proc: subprocess.Popen | None = None

    def publish(self, addresses: list[str]) -> None:
        self.hosts.write_text("".join(f"{a} {self.NAME}\n" for a in addresses))
        if self.proc:
            self.proc.send_signal(signal.SIGHUP)

    def start(self, addresses: list[str]) -> "Dns":
        self.publish(addresses)
        self.proc = subprocess.Popen([DNSMASQ, "-k", "--conf-file=/dev/null", f"--port={self.port}",
                                      "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                                      f"--addn-hosts={self.hosts}", "--local-ttl=1", "--user=root"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        stop(self.proc)
