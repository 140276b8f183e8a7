"""Session fixtures for the end-to-end tests on a real control plane.

The session starts it with scripts/cluster-up.sh (a no-op when it is already
up), installs the Helm chart, and runs the operator as a subprocess that
authenticates as the chart's ServiceAccount (a token from the TokenRequest
API), so every test also proves the chart's RBAC is enough.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import urllib.request

import pytest
import yaml
from support import kube
from support.kube import CLUSTER_DIR, RELEASE, RELEASE_NS, ROOT, SERVICE_ACCOUNT, kubectl, wait_for
from support.net import free_port, stop


class Operator:
    """The operator as a subprocess, logged in with the chart's ServiceAccount token."""

    def __init__(self, namespace: str, service_account: str):
        self.namespace, self.service_account = namespace, service_account
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.starts = 0
        self.log_path = CLUSTER_DIR / "logs" / "operator-test.log"

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    def start(self) -> None:
        # A fresh token each start: the ServiceAccount may have been recreated.
        self.kubeconfig = service_account_kubeconfig(self.namespace, self.service_account)
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path.with_suffix(f".{self.starts}.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatstream_operator", "--liveness", self.liveness_url],
            stdout=self.log, stderr=subprocess.STDOUT, env=kube.env(self.kubeconfig), cwd=ROOT,
        )
        wait_for("the operator's liveness endpoint", self.alive, timeout=60)

    def alive(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"operator exited: {self.lines()[-20:]}"
        try:
            with urllib.request.urlopen(self.liveness_url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        stop(self.proc, 30)
        self.log.close()

    def lines(self) -> list[str]:
        return self.log_path.with_suffix(f".{self.starts}.log").read_text().splitlines()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines() if line.strip()]


def service_account_kubeconfig(namespace: str, name: str) -> pathlib.Path:
    """A kubeconfig holding a short-lived token of the ServiceAccount."""
    token = kubectl("create", "token", name, "-n", namespace, "--duration", "2h").stdout.strip()
    admin = yaml.safe_load((CLUSTER_DIR / "kubeconfig").read_text())
    admin["users"] = [{"name": name, "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = name
    path = CLUSTER_DIR / f"{name}-sa.kubeconfig"
    path.write_text(yaml.safe_dump(admin))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def cluster():
    """The control plane (support.kube.cluster)."""
    with kube.cluster(down_timeout=120) as kubeconfig:
        yield kubeconfig


@pytest.fixture(scope="session")
def release(cluster) -> str:
    kube.install_chart(wait="120s")
    return RELEASE


@pytest.fixture(scope="session")
def operator(release):
    op = Operator(RELEASE_NS, SERVICE_ACCOUNT)
    op.start()
    yield op
    op.stop()


@pytest.fixture
def namespace(cluster):
    """A fresh namespace per test, removed afterwards."""
    with kube.namespace("t") as name:
        yield name
