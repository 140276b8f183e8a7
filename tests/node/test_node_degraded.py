"""A model that cannot load (a hub model that does not exist; pods have no
network): the resource says Degraded with the loader's message, instead of a
pod sitting Running-but-NotReady for the whole startup budget."""

from __future__ import annotations

import time

import pytest
from node_helpers import example, record
from support.kube import apply, condition, get, wait_for
pytestmark = pytest.mark.node

MISSING = "hf:chatstream-tests/no-such-model"


def test_a_model_that_cannot_load_turns_the_resource_degraded(operator_pod, namespace):
    ns, name = namespace, "broken"
    body = example(name, replicas=1)
    body["spec"]["model"] = {"source": MISSING, "device": "cpu", "dtype": "float32"}
    t0 = time.monotonic()
    apply(body, ns)
    # Degraded with the loader's message. A busy kubelet may first fail to create the container for a
    # while ("failed to sync secret cache: timed out waiting for the condition", CreateContainerConfigError,
    # as in CI on 2026-12-06): the resource is rightly Degraded then too, with that message, and turns to
    # the loader's once the container runs.
    seen = []

    def loader_said() -> dict | None:
        degraded = condition(get("csd", name, ns), "Degraded")
        if degraded.get("status") == "True" and degraded.get("reason") not in seen:
            seen.append(degraded.get("reason"))
        return degraded if degraded.get("status") == "True" and "no-such-model" in degraded["message"] else None

    wait_for("Degraded=True with the loader's message", loader_said, timeout=300, interval=2)
    record("model that cannot load -> Degraded", time.monotonic() - t0)
    print(f"Degraded reasons in turn: {seen}")
    assert condition(get("csd", name, ns), "Ready").get("status") == "False"
