"""kubectl and helm against the tests' cluster (scripts/cluster-up.sh): the paths, calls that
fail with their output, polling, and the session's cluster and namespaces. Used by tests/cluster
and tests/node."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import time
import uuid

import httpx
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER_DIR = ROOT / ".cluster"
CACHE = pathlib.Path(os.environ.get("CHATSTREAM_K8S_CACHE", pathlib.Path.home() / ".cache/chatstream-k8s"))
BIN = CACHE / "bin"
RELEASE, RELEASE_NS = "chatstream", "chatstream-system"
SERVICE_ACCOUNT = "chatstream"  # the chart's fullname for release "chatstream"
CRD = "crd/chatstreamdeployments.chatstream.io"


def env(kubeconfig: pathlib.Path | None = None) -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e['PATH']}"
    e["KUBECONFIG"] = str(kubeconfig or CLUSTER_DIR / "kubeconfig")
    return e


def run(*args: str, input: str | None = None, check: bool = True, timeout: float = 180,
        kubeconfig: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, input=input, capture_output=True, text=True, env=env(kubeconfig), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kubectl(*args: str, **kw) -> subprocess.CompletedProcess:
    return run(str(BIN / "kubectl"), *args, **kw)


def get(kind: str, name: str, namespace: str | None = None) -> dict | None:
    """The object, or None when it does not exist."""
    args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
    proc = kubectl(*args, check=False)
    if proc.returncode != 0:
        if "NotFound" in proc.stderr:
            return None
        raise AssertionError(proc.stderr)
    return json.loads(proc.stdout)


def get_list(kind: str, namespace: str, selector: str = "") -> list[dict]:
    args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
    return json.loads(kubectl(*args).stdout)["items"]


def apply(manifest: dict | str, namespace: str, **kw) -> subprocess.CompletedProcess:
    text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
    return kubectl("apply", "-n", namespace, "-f", "-", input=text, **kw)


def wait_for(what: str, fn, timeout: float = 60, interval: float = 0.5):
    """Poll fn until it returns something truthy; fail with `what` if it never does. A call
    that fails (a kubectl error, a refused connection) counts as not yet."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (AssertionError, OSError, httpx.TransportError) as err:  # httpx's errors are not OSErrors
            last = err
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def condition(obj: dict | None, type_: str) -> dict:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def pod_ready(pod: dict) -> bool:
    return condition(pod, "Ready").get("status") == "True"


def cluster_is_up() -> bool:
    if not (CLUSTER_DIR / "kubeconfig").exists() or not (BIN / "kubectl").exists():
        return False
    return kubectl("get", "--raw", "/readyz", check=False).returncode == 0


@contextlib.contextmanager
def cluster(down_timeout: float):
    """scripts/cluster-up.sh (a no-op when all is up) for a test session. A cluster that was
    already up (make cluster) stays; one started here is stopped at the end, unless
    CHATSTREAM_KEEP_CLUSTER=1."""
    started = not cluster_is_up()
    subprocess.run([str(ROOT / "scripts/cluster-up.sh")], check=True, timeout=3600)
    yield CLUSTER_DIR / "kubeconfig"
    if started and os.environ.get("CHATSTREAM_KEEP_CLUSTER") != "1":
        subprocess.run([str(ROOT / "scripts/cluster-down.sh")], check=False, timeout=down_timeout)


def install_chart(*flags: str, wait: str = "120s", timeout: float = 180) -> None:
    """The chart, installed as a user would (CRD, RBAC, operator Deployment); `flags` go to helm."""
    run(str(BIN / "helm"), "upgrade", "--install", RELEASE, str(ROOT / "charts/chatstream"),
        "--namespace", RELEASE_NS, "--create-namespace", *flags, "--wait", "--timeout", wait, timeout=timeout)
    kubectl("wait", "--for=condition=Established", CRD, "--timeout=60s")


@contextlib.contextmanager
def namespace(prefix: str):
    """A fresh namespace with its default ServiceAccount, deleted (without waiting) afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    wait_for("the default ServiceAccount", lambda: get("serviceaccount", "default", name))
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)
