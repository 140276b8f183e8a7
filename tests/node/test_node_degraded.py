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
    degraded = wait_for("Degraded=True", lambda: condition(get("csd", name, ns), "Degraded").get("status") == "True"
                        and condition(get("csd", name, ns), "Degraded"), timeout=300, interval=2)
    record("model that cannot load -> Degraded", time.monotonic() - t0)
    assert "no-such-model" in degraded["message"], degraded
    assert condition(get("csd", name, ns), "Ready").get("status") == "False"
