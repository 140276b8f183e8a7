"""The CRD as the API server sees it: installed, validated, discoverable."""

from __future__ import annotations

import json

import pytest
import yaml

from support.kube import ROOT, apply, kubectl

pytestmark = pytest.mark.cluster

VALID = {
    "apiVersion": "chatstream.io/v1alpha1",
    "kind": "ChatStreamDeployment",
    "metadata": {"name": "probe"},
    "spec": {"model": {"source": "builtin:smollm2-135m-instruct"}},
}


def with_spec(**changes) -> dict:
    doc = json.loads(json.dumps(VALID))
    doc["spec"].update(changes)
    return doc


def test_crd_is_served_with_short_name_and_subresources(release):
    crd = json.loads(kubectl("get", "crd", "chatstreamdeployments.chatstream.io", "-o", "json").stdout)
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["csd"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Model", "Replicas", "Ready", "Concurrency", "Routing", "Scaling", "Age"]
    # Installed by Helm and kept when the release is uninstalled.
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    resources = kubectl("api-resources", "--api-group=chatstream.io", "-o", "wide").stdout
    assert "csd" in resources and "chatstreamdeployments" in resources


def test_api_server_fills_defaults(release, namespace):
    apply(VALID, namespace)
    spec = json.loads(kubectl("get", "csd", "probe", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["replicas"] == 1
    # The service's own defaults (chatstream.settings), one per setting.
    assert spec["concurrency"] == {"maxConcurrentStreams": 8, "maxQueueSize": 32}
    assert spec["shutdownGraceSeconds"] == 30
    assert spec["generation"] == {"maxNewTokens": 256, "contextLength": 2048, "prefixCacheTokens": 4096,
                                  "windowKeep": 0.25}
    assert spec["model"] == {"source": "builtin:smollm2-135m-instruct", "dtype": "auto", "device": "auto"}
    assert spec["sessions"] == {"store": "memory"}


INVALID = [
    pytest.param(with_spec(replicas=-1), "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0", id="negative-replicas"),
    pytest.param(with_spec(concurrency={"maxConcurrentStreams": 0}), "spec.concurrency.maxConcurrentStreams in body should be greater than or equal to 1", id="zero-concurrency"),
    pytest.param(with_spec(model={"source": "builtin:smollm2-135m-instruct", "device": "tpu"}), 'spec.model.device: Unsupported value: "tpu": supported values: "auto", "cpu", "cuda"', id="unknown-device"),
    pytest.param({**VALID, "spec": {"replicas": 1}}, "spec.model: Required value", id="missing-model"),
    pytest.param(with_spec(model={"source": "gpt-4"}), "model.source must be builtin:smollm2-135m-instruct, hf:ORG/NAME or an absolute /path", id="unknown-source"),
    pytest.param(with_spec(model={"source": "hf:just-a-name"}), "an hf: source is hf:ORG/NAME", id="hf-without-org"),
    pytest.param(with_spec(model={"source": "builtin:smollm2-135m-instruct", "revision": "main"}), "model.revision applies only to hf: sources", id="revision-on-builtin"),
    pytest.param(with_spec(sessions={"store": "redis"}), "sessions.store redis needs sessions.redisURLSecretRef", id="redis-without-url"),
    pytest.param(with_spec(model={"source": "builtin:smollm2-135m-instruct", "cache": {"size": "1Gi"}}), "model.cache applies only to hf: sources", id="cache-on-builtin"),
    pytest.param(with_spec(model={"source": "builtin:smollm2-135m-instruct", "tokenSecretRef": {"name": "t"}}), "model.tokenSecretRef applies only to hf: sources", id="token-on-builtin"),
    pytest.param(with_spec(model={"source": "hf:org/m", "cache": {}}), "model.cache needs either claimName", id="cache-without-claim-or-size"),
    pytest.param(with_spec(model={"source": "hf:org/m", "cache": {"size": "1Gi", "claimName": "c"}}), "model.cache needs either claimName", id="cache-with-claim-and-size"),
    pytest.param(with_spec(model={"source": "hf:org/m", "cache": {"claimName": "c", "storageClassName": "fast"}}), "apply only to the claim the operator makes", id="class-for-users-claim"),
    pytest.param(with_spec(model={"source": "hf:org/m", "cache": {"size": "lots"}}), "spec.model.cache.size in body should match", id="cache-size-not-a-quantity"),
    # The server exits on a context under 64 tokens: the API server refuses it first.
    pytest.param(with_spec(generation={"maxNewTokens": 8, "contextLength": 16}), "spec.generation.contextLength in body should be greater than or equal to 64", id="context-too-short"),
    pytest.param(with_spec(generation={"maxNewTokens": 4096, "contextLength": 2048}), "generation.maxNewTokens must be smaller than generation.contextLength", id="tokens-exceed-context"),
    pytest.param(
        with_spec(model={"source": "builtin:smollm2-135m-instruct", "device": "cpu"}, resources={"limits": {"nvidia.com/gpu": 1}}),
        "model.device is cpu but resources ask for nvidia.com/gpu", id="gpu-for-cpu-model",
    ),
    pytest.param(with_spec(tracing={"otlpEndpoint": "collector:4318"}), "tracing.otlpEndpoint must be an http:// or https:// URL", id="endpoint-without-scheme"),
    pytest.param(with_spec(tracing={"samplingRatio": 1.5}), "spec.tracing.samplingRatio in body should be less than or equal to 1", id="ratio-above-one"),
]


@pytest.mark.parametrize("doc, message", INVALID)
def test_invalid_resources_are_rejected_with_a_clear_message(release, namespace, doc, message):
    proc = apply(doc, namespace, check=False)
    assert proc.returncode != 0, f"accepted: {yaml.safe_dump(doc)}"
    assert message in proc.stderr, proc.stderr
    assert kubectl("get", "csd", "-n", namespace, "-o", "name").stdout == ""


def test_examples_and_plain_manifests_are_accepted_by_the_api_server(release, namespace):
    for path in sorted((ROOT / "manifests/examples").glob("*.yaml")):
        kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
    # `kubectl apply -f manifests/`, checked by the server (the chart's
    # release already made the chatstream-system namespace).
    out = kubectl("apply", "--dry-run=server", "-f", str(ROOT / "manifests")).stdout
    kinds = sorted(line.split("/")[0] for line in out.splitlines())
    assert kinds == sorted([
        "customresourcedefinition.apiextensions.k8s.io", "namespace", "deployment.apps", "serviceaccount",
        "clusterrole.rbac.authorization.k8s.io", "clusterrolebinding.rbac.authorization.k8s.io",
    ]), out
