"""The CRD, RBAC and operator Deployment are written twice (plain manifests and
the chart); these tests keep the copies from drifting apart."""

from __future__ import annotations

import importlib.util
import json
import re

import yaml

from chatstream_operator import resources

from builder_helpers import CRD, ROOT

CHART = ROOT / "charts/chatstream"


def load_sync_script():
    spec = importlib.util.spec_from_file_location("sync_chart_crd", ROOT / "hack/sync-chart-crd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_crd_is_generated_from_manifests():
    sync = load_sync_script()
    assert (CHART / "templates/crd.yaml").read_text() == sync.chart_crd((ROOT / "manifests/crd.yaml").read_text()), \
        "run hack/sync-chart-crd.py"


def test_crd_names_match_the_operator():
    assert CRD["spec"]["group"] == resources.GROUP
    assert CRD["spec"]["names"]["plural"] == resources.PLURAL
    assert CRD["spec"]["names"]["kind"] == resources.KIND
    assert [v["name"] for v in CRD["spec"]["versions"]] == [resources.VERSION]


def _static_rules(template: str) -> list:
    """The ClusterRole's rules from the chart template (they contain no template directives)."""
    block = template.split("rules:\n", 1)[1].split("{{-", 1)[0]
    return yaml.safe_load(block)


def test_chart_and_manifests_grant_the_same_rules():
    manifest_role = next(d for d in yaml.safe_load_all((ROOT / "manifests/rbac.yaml").read_text()) if d["kind"] == "ClusterRole")
    assert _static_rules((CHART / "templates/rbac.yaml").read_text()) == manifest_role["rules"]
    for rule in manifest_role["rules"]:
        assert not {"*", "delete", "update", "deletecollection"} & set(rule["verbs"]), rule


def test_default_service_images_agree():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    deployment = yaml.safe_load((ROOT / "manifests/operator.yaml").read_text())
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    images = resources.Images()
    assert values["serviceImages"] == {"cpu": images.cpu, "gpu": images.gpu, "router": images.router}
    assert env == {"CHATSTREAM_OPERATOR_IMAGE": images.cpu, "CHATSTREAM_OPERATOR_GPU_IMAGE": images.gpu,
                   "CHATSTREAM_OPERATOR_ROUTER_IMAGE": images.router, "CHATSTREAM_OPERATOR_ACTIVATOR_IMAGE": images.activator}
    # The activator is the operator's own image (the chart's operator image by default).
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert images.activator == f"{values['image']['repository']}:{chart['appVersion']}" == deployment["spec"]["template"][
        "spec"]["containers"][0]["image"]
    chart_template = (CHART / "templates/deployment.yaml").read_text()
    assert set(re.findall(r"name: (CHATSTREAM_OPERATOR_\w+)", chart_template)) == set(env)


def test_values_schema_is_valid_json_and_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


def test_network_policy_selects_the_operators_pod_labels_and_port():
    """The chart's NetworkPolicy names pods by the labels the operator gives them: if either side changed
    alone, the policy would select no model pod (nothing protected) or no router (every stream refused).
    tests/cluster/test_cluster_helm.py renders it with helm."""
    from chatstream_operator import router
    policy = (CHART / "templates/networkpolicy.yaml").read_text()
    model = resources.labels("x")["app.kubernetes.io/name"]
    routers = router.router_labels("x")["app.kubernetes.io/name"]
    assert re.search(rf"podSelector:\s+matchLabels:\s+app\.kubernetes\.io/name: {model}\n", policy)
    assert re.search(rf"- podSelector:\s+matchLabels:\s+app\.kubernetes\.io/name: {routers}\n", policy)
    assert re.search(rf"- port: {resources.PORT}\n", policy)
