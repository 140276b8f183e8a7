"""Helpers for the end-to-end tests: kubectl, polling, the operator process."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER_DIR = ROOT / ".cluster"
BIN = pathlib.Path(os.environ.get("CHATSTREAM_K8S_CACHE", pathlib.Path.home() / ".cache/chatstream-k8s")) / "bin"
RELEASE, RELEASE_NS = "chatstream", "chatstream-system"
SERVICE_ACCOUNT = "chatstream"  # the chart's fullname for release "chatstream"


def env(kubeconfig: pathlib.Path | None = None) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e['PATH']}"
    e["KUBECONFIG"] = str(kubeconfig or CLUSTER_DIR / "kubeconfig")
    return e


def run(*args: str, input: str | None = None, check: bool = True, kubeconfig=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, input=input, capture_output=True, text=True, env=env(kubeconfig), timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kubectl(*args: str, **kw) -> subprocess.CompletedProcess:
    return run(str(BIN / "kubectl"), *args, **kw)


def get(kind: str, name: str, namespace: str) -> dict | None:
    proc = kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    if proc.returncode != 0:
        if "NotFound" in proc.stderr:
            return None
        raise AssertionError(proc.stderr)
    return json.loads(proc.stdout)


def get_list(kind: str, namespace: str, selector: str = "") -> list[dict]:
    args = ["get", kind, "-n", namespace, "-o", "json"]
    if selector:
        args += ["-l", selector]
    return json.loads(kubectl(*args).stdout)["items"]


def wait_for(what: str, fn, timeout: float = 60, interval: float = 0.5):
    """Poll fn until it returns something truthy; fail with `what` if it never does."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except AssertionError as err:  # a kubectl call failed; keep trying
            last = err
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def apply(manifest: dict | str, namespace: str, **kw) -> subprocess.CompletedProcess:
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    return kubectl("apply", "-n", namespace, "-f", "-", input=text, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Operator:
    """The operator as a subprocess, logged in with the chart's ServiceAccount token."""

    def __init__(self, namespace: str, service_account: str):
        self.namespace, self.service_account = namespace, service_account
        self.proc: subprocess.Popen | None = None
        self.port = _free_port()
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
            stdout=self.log, stderr=subprocess.STDOUT, env=env(self.kubeconfig), cwd=ROOT,
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
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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
