"""Session fixtures for the end-to-end tests on a real control plane.

The session starts it with scripts/cluster-up.sh (a no-op when it is already
up), installs the Helm chart, and runs the operator as a subprocess that
authenticates as the chart's ServiceAccount (a token from the TokenRequest
API), so every test also proves the chart's RBAC is enough.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from kube_helpers import (
    BIN, CLUSTER_DIR, RELEASE, RELEASE_NS, ROOT, SERVICE_ACCOUNT, Operator, get, kubectl, run,
    wait_for,
)


def _cluster_is_up() -> bool:
    if not (CLUSTER_DIR / "kubeconfig").exists() or not (BIN / "kubectl").exists():
        return False
    return kubectl("get", "--raw", "/readyz", check=False).returncode == 0


@pytest.fixture(scope="session")
def cluster():
    """The control plane: reused when already up (make cluster); otherwise
    started here and stopped after the session (CHATSTREAM_KEEP_CLUSTER=1 keeps it)."""
    started = not _cluster_is_up()
    subprocess.run([str(ROOT / "scripts/cluster-up.sh")], check=True, timeout=3600)
    yield CLUSTER_DIR / "kubeconfig"
    if started and os.environ.get("CHATSTREAM_KEEP_CLUSTER") != "1":
        subprocess.run([str(ROOT / "scripts/cluster-down.sh")], check=False, timeout=120)


@pytest.fixture(scope="session")
def release(cluster) -> str:
    """The chart, installed as a user would (CRD, RBAC, operator Deployment)."""
    run(
        str(BIN / "helm"), "upgrade", "--install", RELEASE, str(ROOT / "charts/chatstream"),
        "--namespace", RELEASE_NS, "--create-namespace", "--wait", "--timeout", "120s",
    )
    kubectl("wait", "--for=condition=Established", "crd/chatstreamdeployments.chatstream.io", "--timeout=60s")
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
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    wait_for("the default ServiceAccount", lambda: get("serviceaccount", "default", name))
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)
