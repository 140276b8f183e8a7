"""The router's children on a real API server (kwok nodes run the pods):
created with the chart's RBAC, watched (a deleted one comes back), shown in
status and `kubectl get csd`, scaled to 0 when routing is turned off. What
the router does with traffic is tested on the real haproxy in tests/router."""

from __future__ import annotations

import time

import pytest

from support.kube import apply, get, kubectl, wait_for

pytestmark = pytest.mark.cluster

NAME = "routed"


def resource(routing: dict | None = None) -> dict:
    spec = {"model": {"source": "builtin:smollm2-135m-instruct"}, "replicas": 2}
    if routing is not None:
        spec["routing"] = routing
    return {"apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment", "metadata": {"name": NAME},
            "spec": spec}


def test_router_children_status_and_switch(operator, namespace):
    ns = namespace
    apply(resource(), ns)
    endpoint = f"http://{NAME}-router.{ns}.svc:8000"
    wait_for("the routing endpoint in status",
             lambda: (get("csd", NAME, ns).get("status") or {}).get("routingEndpoint") == endpoint, timeout=60)
    config = get("configmap", f"{NAME}-router", ns)
    assert f"server-template pod 1-32 {NAME}-pods.{ns}.svc.cluster.local:8000" in config["data"]["haproxy.cfg"]
    assert get("service", f"{NAME}-pods", ns)["spec"]["clusterIP"] == "None"
    assert get("service", f"{NAME}-router", ns)["spec"]["ports"][0]["port"] == 8000
    router = get("deployment", f"{NAME}-router", ns)
    assert router["spec"]["replicas"] == 1
    assert router["metadata"]["ownerReferences"][0]["name"] == NAME
    def router_ready():
        conds = (get("csd", NAME, ns).get("status") or {}).get("conditions") or []
        return any(c["type"] == "RouterReady" and c["status"] == "True" for c in conds)
    wait_for("status to say the router is ready", router_ready, timeout=90)
    assert get("deployment", f"{NAME}-router", ns)["status"]["readyReplicas"] == 1
    table = kubectl("get", "csd", NAME, "-n", ns).stdout.splitlines()
    assert endpoint in table[1].split()

    # Level-triggered: a deleted ConfigMap is back at once, with the same config.
    t0 = time.monotonic()
    kubectl("delete", "configmap", f"{NAME}-router", "-n", ns, "--wait=true")
    back = wait_for("the ConfigMap to come back", lambda: get("configmap", f"{NAME}-router", ns), timeout=10,
                    interval=0.1)
    print(f"\ndeleted router ConfigMap back after {time.monotonic() - t0:.2f}s")
    assert back["data"] == config["data"]

    # Turned off: no router runs, status drops the endpoint; on again: back.
    apply(resource({"enabled": False}), ns)
    wait_for("the router scaled to 0 and the endpoint gone", lambda: (
        get("deployment", f"{NAME}-router", ns)["spec"]["replicas"] == 0
        and "routingEndpoint" not in (get("csd", NAME, ns).get("status") or {})), timeout=30)
    apply(resource({"enabled": True}), ns)
    wait_for("the router back", lambda: (
        get("deployment", f"{NAME}-router", ns)["spec"]["replicas"] == 1
        and (get("csd", NAME, ns).get("status") or {}).get("routingEndpoint") == endpoint), timeout=30)
