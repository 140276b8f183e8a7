"""Fixtures for the tests on the real node (marker `node`).

The session brings the cluster up with scripts/cluster-up.sh, which starts the
control plane, the kwok nodes and one real node (a no-op when all are up),
builds the images with scripts/build-images.sh (incremental) and imports them
into the node's containerd (only when their image ID changed). The chart is
then installed the way a user installs it: the operator runs in the cluster, as
a pod from its image, with the chart's ServiceAccount and RBAC.

These tests run after those that need no cluster, and before tests/cluster,
which runs the operator as a host process for the whole session (two operators
must not share the cluster's resources): tests/conftest.py orders them and
starts scripts/prebuild.sh beside the first ones.
"""

from __future__ import annotations

import json
import time

import pytest
from node_helpers import (
    NODE_NAME, ON_REAL_NODE, OPERATOR_IMAGE, REDIS_IMAGE, ROUTER_IMAGE, SERVICE_IMAGE, TIMINGS, Background, record,
)
from support import kube
from support.kube import BIN, RELEASE, RELEASE_NS, ROOT, get, get_list, pod_ready, run, wait_for
from support.podman import podman


# The first node test's setup may build the binaries, the images and import
# them (on a fresh machine: 15-20 min quiet, more on a loaded one), which the
# suite's 600 s per-test timeout would cut.
SETUP_BUDGET_SECONDS = 2700


def pytest_collection_modifyitems(config, items):  # their order: tests/conftest.py
    for item in items:
        if item.get_closest_marker("node") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SETUP_BUDGET_SECONDS))


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("real node figures")
        for line in TIMINGS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def image_build():
    """scripts/build-images.sh (incremental), started before the cluster so
    that on a fresh machine the image build (downloads, unpacking, layer
    commits) runs beside the Go build of the binaries (niced) instead of after
    it; node_images waits for it. Its output goes to .cluster/build-images.log."""
    build = Background("build-images", "bash", str(ROOT / "scripts/build-images.sh"))
    yield build
    build.stop()


@pytest.fixture(scope="session")
def node(image_build):
    """The cluster (support.kube.cluster) with its real node Ready."""
    t0 = time.monotonic()
    with kube.cluster(down_timeout=300):
        record("cluster-up (control plane and real node)", time.monotonic() - t0)
        if get("node", NODE_NAME) is None:
            pytest.skip("no real node: another cluster directory on this machine holds it (scripts/node-up.sh)")
        wait_for("the real node Ready", lambda: pod_ready(get("node", NODE_NAME)), timeout=60)
        yield NODE_NAME


@pytest.fixture(scope="session")
def trace_backend_build(node):
    """scripts/trace-backend.sh build (Jaeger, a Go build of 4-5 min on a fresh
    machine), started niced once the cluster is up, so that it runs beside the
    image import, which waits on the disk, instead of after everything else;
    the traces test waits for it. Output: .cluster/trace-backend.log."""
    build = Background("trace-backend", "nice", "-n", "19", "bash", str(ROOT / "scripts/trace-backend.sh"), "build")
    yield build
    build.stop()


@pytest.fixture(scope="session")
def node_images(node, image_build, trace_backend_build):
    """The images built from this tree, in the node's containerd."""
    record("image build (beside cluster-up)", image_build.wait(timeout=3600))
    t0 = time.monotonic()
    images = {"operator": OPERATOR_IMAGE, "service": SERVICE_IMAGE, "router": ROUTER_IMAGE}
    out = run(str(ROOT / "scripts/node-up.sh"), "import", *images.values(), timeout=1800)
    took = time.monotonic() - t0
    warm = out.stderr.count("already imported") == len(images)
    record(f"image import into containerd ({'unchanged, skipped' if warm else 'imported'})", took)
    return images


@pytest.fixture(scope="session")
def redis_image(node_images):
    """Debian's redis-server in an image built here, in the node's containerd."""
    podman("build", "--network", "host", "--layers", "-q", "-f", str(ROOT / "tests/node/images/redis.Containerfile"),
           "-t", REDIS_IMAGE, str(ROOT / "tests/node/images"), timeout=900)
    run(str(ROOT / "scripts/node-up.sh"), "import", REDIS_IMAGE, timeout=600)
    return REDIS_IMAGE


@pytest.fixture(scope="package")
def operator_pod(node_images) -> dict:
    """`helm install` of the chart, its operator pinned to the real node.
    Uninstalled after the package (the CRD stays, as the chart keeps it)."""
    t0 = time.monotonic()
    kube.install_chart("--set-json", f"nodeSelector={json.dumps(ON_REAL_NODE['nodeSelector'])}",
                       "--set-json", f"tolerations={json.dumps(ON_REAL_NODE['tolerations'])}",
                       wait="180s", timeout=240)

    def running_pod():
        pods = get_list("pods", RELEASE_NS, "app.kubernetes.io/name=chatstream-operator")
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return live[0] if len(live) == 1 and pod_ready(live[0]) else None

    pod = wait_for("the operator pod Ready", running_pod, timeout=120)
    record("helm install -> operator pod Ready", time.monotonic() - t0)
    yield pod
    run(str(BIN / "helm"), "uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--timeout", "120s",
        check=False, timeout=180)


@pytest.fixture(scope="module")
def module_namespace(node):
    with kube.namespace("node") as name:
        yield name


@pytest.fixture
def namespace(node):
    with kube.namespace("node") as name:
        yield name
