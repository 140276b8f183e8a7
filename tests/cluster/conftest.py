"""Session fixtures for the end-to-end tests on a real control plane.

The session starts it with scripts/cluster-up.sh (a no-op when it is already
up), installs the Helm chart, and runs the operator as a subprocess that
authenticates as the chart's ServiceAccount (a token from the TokenRequest
API), so every test also proves the chart's RBAC is enough.
"""

from __future__ import annotations

import pathlib
import subprocess
import uuid

import pytest
from kube_helpers import (
    BIN, CLUSTER_DIR, RELEASE, RELEASE_NS, ROOT, SERVICE_ACCOUNT, Operator, get, kubectl, run,
    wait_for,
)


@pytest.fixture(scope="session")
def cluster() -> pathlib.Path:
    subprocess.run([str(ROOT / "scripts/cluster-up.sh")], check=True, timeout=3600)
    return CLUSTER_DIR / "kubeconfig"


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
