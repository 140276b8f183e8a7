"""The router image (router/Containerfile) runs the operator's rendered
config as the cluster would: non-root, read-only root, config from a mounted
directory (the ConfigMap). What the config does with traffic is tested on the
host's haproxy in tests/router."""

from __future__ import annotations

import os
import tempfile
import time

import httpx
import pytest
from image_helpers import TAG
from support.net import free_port
from support.podman import have_podman, image_exists, podman

from chatstream_operator import router

pytestmark = [
    pytest.mark.images,
    pytest.mark.skipif(not have_podman(), reason="needs podman and runc: scripts/system-deps-cluster.sh images"),
]

ROUTER_IMAGE = f"localhost/chatstream-router:{TAG}"


@pytest.fixture(scope="module")
def router_image(images):
    assert image_exists(ROUTER_IMAGE), "scripts/build-images.sh did not build the router"
    return ROUTER_IMAGE


def test_router_image_runs_the_rendered_config_locked_down(router_image):
    inspect = podman("image", "inspect", "--format", "{{.Config.User}} {{.Config.StopSignal}}", router_image)
    assert inspect.stdout.split() == [f"{router.UID}:{router.UID}", "SIGUSR1"]
    port, monitor = free_port(), free_port()
    # The cluster form (resolvers + server-template), on free host ports; no
    # DNS name resolves here, so the router runs with no pod: not ready.
    config = router.haproxy_config("demo", "default", bind=f"127.0.0.1:{port}", monitor_bind=f"127.0.0.1:{monitor}")
    with tempfile.TemporaryDirectory() as cfg, tempfile.TemporaryDirectory() as run:
        with open(f"{cfg}/{router.CONFIG_KEY}", "w") as f:
            f.write(config)
        os.chmod(cfg, 0o755)
        os.chmod(f"{cfg}/{router.CONFIG_KEY}", 0o644)
        os.chmod(run, 0o777)  # an emptyDir in the pod
        name = f"router-test-{port}"
        podman("run", "-d", "--name", name, "--network=host", "--read-only", "--cap-drop=ALL",
               "--security-opt=no-new-privileges", f"--user={router.UID}:{router.UID}",
               "-v", f"{cfg}:{router.CONFIG_DIR}:ro", "-v", f"{run}:/run/haproxy", router_image)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    health = httpx.get(f"http://127.0.0.1:{monitor}/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, podman("logs", name, check=False).stderr
                    time.sleep(0.2)
            assert health.status_code == 503  # no pod resolved: not ready
            assert "haproxy_backend_active_servers" in httpx.get(f"http://127.0.0.1:{monitor}/metrics").text
            assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 503  # no pod to send it to
            assert podman("exec", name, "id", "-u").stdout.strip() == str(router.UID)
            t0 = time.monotonic()
            podman("stop", "-t", "10", name)
            assert time.monotonic() - t0 < 5, "SIGUSR1 (soft stop) ends an idle router at once"
        finally:
            podman("rm", "-f", name, check=False)
