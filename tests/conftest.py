"""Shared fixtures (the real default model, loaded once, and real HTTP servers around it), the tests' order
and the background build of what the cluster's tests need."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from support.net import LiveServer

ROOT = Path(__file__).resolve().parent.parent
# The tests that need the cluster and what it is built from, in the order they run, after all the
# others: the real node's first (tests/cluster runs an operator on the host for the whole session,
# and two operators must not share the cluster), then the cluster's and the images'.
LAST = ("node", "cluster", "images")
_prebuild: subprocess.Popen | None = None


def _rank(item) -> int:
    """0 for a test that needs no cluster, else 1 + its marker's place in LAST."""
    return next((i + 1 for i, marker in enumerate(LAST) if item.get_closest_marker(marker)), 0)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_rank)


def pytest_collection_finish(session):
    """scripts/prebuild.sh in the background, niced, when the run has tests on the cluster: on a
    fresh machine the Go builds and the images then run beside the tests that need neither, which
    come first, instead of holding up the first node test (the script says more). Its output:
    .cluster/prebuild.log. CHATSTREAM_PREBUILD=0 leaves it to the fixtures, as before."""
    global _prebuild
    if (os.environ.get("CHATSTREAM_PREBUILD", "1") == "0" or session.config.option.collectonly
            or not any(_rank(item) for item in session.items)):
        return
    log_dir = Path(os.environ.get("CLUSTER_DIR") or ROOT / ".cluster")
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "prebuild.log", "wb") as log:
        _prebuild = subprocess.Popen(["nice", "-n", "19", "ionice", "-c", "3", "bash", str(ROOT / "scripts/prebuild.sh")],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # Its own session (to be ended as a group) is its own scheduler autogroup where the kernel has
    # them, and between autogroups nice counts for nothing: the first try got half the CPU, and the
    # tests beside it timed out. The group's own nice is what yields to the tests.
    try:
        Path(f"/proc/{_prebuild.pid}/autogroup").write_text("19")
    except OSError:
        pass


def pytest_sessionfinish(session):
    """A prebuild still running when the tests end (an interrupted run) goes with them."""
    if _prebuild is not None and _prebuild.poll() is None:
        os.killpg(_prebuild.pid, signal.SIGTERM)


@pytest.fixture(scope="session")
def model_and_tokenizer():
    from chatstream import load_model
    return load_model("builtin:smollm2-135m-instruct", device="cpu")


@pytest.fixture
def live_server():
    servers = []

    def start(app):
        server = LiveServer(app).__enter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)
