"""The router's pure builders (chatstream_operator.router): haproxy.cfg, its
children, and what status reports. The config itself is checked by the real
haproxy binary (`haproxy -c`); tests/router runs it in front of real pods."""

from __future__ import annotations

import pytest

from builder_helpers import CRD, ROUTER_IMAGE as IMAGE, SCHEMA, haproxy_check, make_resource
from chatstream_operator import resources, router, status
from chatstream_operator.__main__ import parse_args



def children(resource):
    return {(m["kind"], m["metadata"]["name"]): m for m in router.children(resource, IMAGE)}


def test_cluster_config_is_valid_haproxy(tmp_path):
    config = router.configmap(make_resource())["data"][router.CONFIG_KEY]
    result = haproxy_check(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr
    # Pods come from the headless Service through cluster DNS, health-checked on /readyz.
    assert "server-template pod 1-32 chat-pods.team-a.svc.cluster.local:8000 check resolvers cluster" in config
    assert "option httpchk GET /readyz" in config and "option redispatch" in config
    assert "stick store-response res.cook(chatstream_session)" in config


def test_children_are_owned_labelled_and_wired():
    resource = make_resource()
    got = children(resource)
    assert set(got) == {("ConfigMap", "chat-router"), ("Service", "chat-pods"), ("Service", "chat-router"),
                        ("Deployment", "chat-router")}
    for child in got.values():
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == resources.MANAGER
        assert resources.owner_of(child) == "chat"  # watched children trigger a reconcile
    headless = got["Service", "chat-pods"]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"] == resources.labels("chat")
    assert headless["publishNotReadyAddresses"] is False
    front = got["Service", "chat-router"]["spec"]
    deploy = got["Deployment", "chat-router"]["spec"]
    assert front["selector"] == deploy["selector"]["matchLabels"] == deploy["template"]["metadata"]["labels"]
    # Router pods are not chatstream pods: the pods' Service, the scale
    # selector and the status's pod failures never pick them up.
    assert deploy["template"]["metadata"]["labels"] != resources.labels("chat")
    pod = deploy["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == "chat-router"
    container = pod["containers"][0]
    assert container["image"] == IMAGE
    assert container["args"] == ["-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert deploy["replicas"] == 1


def test_a_new_config_rolls_the_router_and_scaling_within_the_slots_does_not():
    base = make_resource()
    annotation = router.CONFIG_HASH_ANNOTATION

    def rolled(spec_change):
        changed = make_resource({**base["spec"], **spec_change})
        a = router.deployment(base, IMAGE)["spec"]["template"]["metadata"]["annotations"][annotation]
        b = router.deployment(changed, IMAGE)["spec"]["template"]["metadata"]["annotations"][annotation]
        return a != b

    assert not rolled({"replicas": 20})
    assert rolled({"replicas": 40})  # more pods than slots: a bigger template
    assert rolled({"routing": {"sessionHeader": "X-Conversation"}})
    assert "server-template pod 1-40 " in router.configmap(make_resource({**base["spec"], "replicas": 40}))["data"][
        router.CONFIG_KEY]


def test_routing_settings_do_not_roll_the_pods():
    base = make_resource()
    other = make_resource({**base["spec"], "routing": {"enabled": False, "sessionHeader": "X-Other"}})
    assert resources.spec_hash(base["spec"]) == resources.spec_hash(other["spec"])


def test_session_header_reaches_the_config_and_nothing_else_can(tmp_path):
    resource = make_resource({"model": {"source": "builtin:smollm2-135m-instruct"},
                              "routing": {"sessionHeader": "X-Conversation-Id"}})
    config = router.configmap(resource)["data"][router.CONFIG_KEY]
    assert "req.hdr(x-conversation-id)" in config and "x-session-id" not in config
    assert haproxy_check(config, tmp_path).returncode == 0
    with pytest.raises(ValueError, match="not a header name"):
        router.haproxy_config("chat", "team-a", session_header="X-A)\n    server evil 10.0.0.1:80")
    # The API server refuses the same values: the CRD has the builder's pattern.
    crd_pattern = SCHEMA["properties"]["routing"]["properties"]["sessionHeader"]["pattern"]
    assert crd_pattern == router.HEADER_PATTERN.pattern


def test_routing_defaults_on():
    spec = make_resource()["spec"]
    assert spec["routing"] == {"enabled": True, "sessionHeader": "X-Session-Id"}
    assert router.routing({"model": {}}) == spec["routing"]  # a hand-built spec gets the same


def test_disabled_routing_scales_the_router_to_zero_and_status_drops_the_endpoint():
    resource = make_resource({"model": {"source": "builtin:smollm2-135m-instruct"}, "routing": {"enabled": False}})
    assert router.deployment(resource, IMAGE)["spec"]["replicas"] == 0
    resource["status"] = {"routingEndpoint": "http://chat-router.team-a.svc:8000"}
    new = status.compute(resource, None, [], None, "2026-11-25T00:00:00Z")
    assert new["routingEndpoint"] is None  # a merge patch with null removes the field
    assert status.changed(resource, new)


def test_status_shows_the_routing_endpoint():
    resource = make_resource()
    new = status.compute(resource, None, [], None, "2026-11-25T00:00:00Z")
    assert new["routingEndpoint"] == "http://chat-router.team-a.svc:8000"
    assert new["endpoint"] == "http://chat.team-a.svc:8000"  # the plain Service stays
    version = CRD["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Routing"] == ".status.routingEndpoint"
    assert "routingEndpoint" in version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]


def test_router_image_setting(monkeypatch):
    assert parse_args([]).router_image == resources.Images().router
    monkeypatch.setenv("CHATSTREAM_OPERATOR_ROUTER_IMAGE", "registry.example/router:1")
    assert parse_args([]).router_image == "registry.example/router:1"


def test_router_does_not_follow_the_model_pods_node_selector():
    """A GPU resource's nodeSelector without its GPU toleration would leave
    the router unschedulable on tainted GPU nodes."""
    resource = make_resource({"model": {"source": "builtin:smollm2-135m-instruct", "device": "cuda"},
                              "nodeSelector": {"accelerator": "nvidia"}})
    pod = router.deployment(resource, IMAGE)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert resources.deployment(resource)["spec"]["template"]["spec"]["nodeSelector"] == {"accelerator": "nvidia"}


def test_router_placement_is_its_own():
    """spec.routing.nodeSelector / tolerations place the router (a tainted
    node the model pods also use, a pool for proxies)."""
    where = {"nodeSelector": {"pool": "edge"}, "tolerations": [{"key": "edge", "operator": "Exists"}]}
    resource = make_resource({"model": {"source": "builtin:smollm2-135m-instruct"}, "routing": where})
    pod = router.deployment(resource, IMAGE)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "edge"} and pod["tolerations"] == where["tolerations"]
    model_pod = resources.deployment(resource)["spec"]["template"]["spec"]
    assert model_pod.get("nodeSelector") != {"pool": "edge"}


def _router_observed(ready: int) -> dict:
    manifest = router.deployment(make_resource(), IMAGE)
    return {**manifest, "status": {"replicas": 1, "readyReplicas": ready}}


def test_status_says_whether_the_router_is_ready():
    resource = make_resource()

    def router_ready(router_deployment, old=None):
        resource["status"] = old or {}
        new = status.compute(resource, None, [], None, "2026-11-25T00:00:00Z", router_deployment)
        return next((c for c in new["conditions"] if c["type"] == "RouterReady"), None), new

    cond, new = router_ready(_router_observed(0))
    assert (cond["status"], cond["reason"]) == ("False", "RouterNotReady")
    cond, new = router_ready(_router_observed(1))
    assert (cond["status"], cond["reason"]) == ("True", "RouterReady")
    # Not read this time (the reconcile failed first): what was reported stays.
    cond, _ = router_ready(None, old=new)
    assert (cond["status"], cond["lastTransitionTime"]) == ("True", new["conditions"][-1]["lastTransitionTime"])
    # Routing off: no router condition at all.
    resource["spec"]["routing"]["enabled"] = False
    cond, _ = router_ready(_router_observed(0), old=new)
    assert cond is None
