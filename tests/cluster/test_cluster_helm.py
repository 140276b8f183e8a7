"""The Helm chart as a platform operator uses it."""

from __future__ import annotations

import json

import pytest
import yaml

from support.kube import BIN, RELEASE, RELEASE_NS, ROOT, apply, get, kubectl, run

pytestmark = pytest.mark.cluster

CHART = str(ROOT / "charts/chatstream")


def helm(*args: str, **kw):
    return run(str(BIN / "helm"), *args, **kw)


def test_chart_lints_clean(cluster):
    out = helm("lint", "--strict", CHART).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out


def test_values_schema_rejects_bad_values(cluster):
    proc = helm("template", RELEASE, CHART, "--set", "logFormat=xml", check=False)
    assert proc.returncode != 0 and "logFormat" in proc.stderr


def test_release_is_deployed_with_operator_and_rbac(release):
    st = json.loads(helm("status", RELEASE, "-n", RELEASE_NS, "-o", "json").stdout)
    assert st["info"]["status"] == "deployed"
    dep = get("deployment", "chatstream", RELEASE_NS)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["chatstream-operator"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert get("serviceaccount", "chatstream", RELEASE_NS)


def test_watch_namespaces_bind_permissions_only_there(cluster):
    docs = [d for d in yaml.safe_load_all(helm(
        "template", RELEASE, CHART, "-n", RELEASE_NS, "--set", "watchNamespaces={team-a,team-b}").stdout) if d]
    bindings = [d for d in docs if d["kind"].endswith("Binding")]
    assert sorted((d["kind"], d["metadata"]["namespace"]) for d in bindings) == [("RoleBinding", "team-a"), ("RoleBinding", "team-b")]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_uninstall_keeps_the_crd_and_the_users_resources(release, namespace):
    """helm.sh/resource-policy: keep — uninstalling the operator must not
    delete every ChatStreamDeployment in the cluster with the CRD."""
    apply({"apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment", "metadata": {"name": "survivor"},
           "spec": {"model": {"source": "builtin:smollm2-135m-instruct"}, "replicas": 0}}, namespace)
    helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait")
    try:
        assert get("crd", "chatstreamdeployments.chatstream.io", "")
        assert get("csd", "survivor", namespace)
    finally:  # put the release back for the other tests
        helm("upgrade", "--install", RELEASE, CHART, "-n", RELEASE_NS, "--wait", "--timeout", "120s")
    assert kubectl("get", "csd", "survivor", "-n", namespace, "-o", "name").stdout.strip()


def test_example_resource_is_created_after_install(release, namespace):
    """With example.enabled the chart creates a ChatStreamDeployment after
    the install (a post-install hook, so the CRD exists by then)."""
    values = "example.enabled=true,example.name=hello,crd.install=false,watchNamespaces={%s}" % namespace
    helm("install", "second", CHART, "-n", namespace, "--set", values, "--wait", "--timeout", "120s")
    try:
        example = get("csd", "hello", namespace)
        assert example["spec"]["model"]["source"] == "builtin:smollm2-135m-instruct"
        assert example["metadata"]["annotations"]["helm.sh/hook"] == "post-install"
    finally:
        helm("uninstall", "second", "-n", namespace, "--wait")


def test_network_policy_lets_only_routers_and_named_namespaces_reach_model_pods(cluster):
    from chatstream_operator import resources, router

    def policies(*values: str) -> list[dict]:
        args = [a for v in values for a in ("--set", v)]
        out = helm("template", RELEASE, CHART, "-n", RELEASE_NS, *args).stdout
        return [d for d in yaml.safe_load_all(out) if d and d["kind"] == "NetworkPolicy"]

    assert policies() == [], "off unless asked for"
    [alone] = policies("networkPolicy.enabled=true")
    assert alone["metadata"]["namespace"] == RELEASE_NS
    assert alone["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "chatstream"}}
    assert [p["podSelector"]["matchLabels"] for p in alone["spec"]["ingress"][0]["from"]] == \
        [{"app.kubernetes.io/name": "chatstream-router"}]
    watched = policies("networkPolicy.enabled=true", "watchNamespaces={team-a,team-b}",
                       "networkPolicy.allowedNamespaces={monitoring,gateway}")
    assert sorted(p["metadata"]["namespace"] for p in watched) == ["team-a", "team-b"]
    rule = watched[0]["spec"]["ingress"][0]
    assert rule["ports"] == [{"port": resources.PORT, "protocol": "TCP"}]
    assert rule["from"][1] == {"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring", "gateway"]}]}}
    # The selectors against the operator's own labels: model pods in, routers out.
    selector = watched[0]["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= resources.labels("chat").items()
    assert not selector.items() <= router.router_labels("chat").items()
    listed = policies("networkPolicy.enabled=true", "watchNamespaces={team-a}", "networkPolicy.namespaces={team-c}")
    assert [p["metadata"]["namespace"] for p in listed] == ["team-c"]
    proc = helm("template", RELEASE, CHART, "--set", "networkPolicy.allowedNamespaces={Bad_NS}", check=False)
    assert proc.returncode != 0 and "allowedNamespaces" in proc.stderr
