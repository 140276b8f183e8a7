"""The operator against a real API server, with kwok nodes running the pods.

Each test applies a resource the way a user would and checks what a user
would look at: the Deployment and Service, the pods, status and
`kubectl get csd`.
"""

from __future__ import annotations

import json

import pytest
import yaml

from kube_helpers import RELEASE_NS, ROOT, SERVICE_ACCOUNT, apply, get, get_list, kubectl, wait_for

pytestmark = pytest.mark.cluster

SELECTOR = "app.kubernetes.io/name=chatstream,app.kubernetes.io/instance={}"


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "manifests/examples" / name).read_text())


def env_of(deployment: dict) -> dict:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def ready_pods(name: str, namespace: str) -> list[dict]:
    pods = get_list("pods", namespace, SELECTOR.format(name))
    return [
        p for p in pods
        if p["status"].get("phase") == "Running"
        and "deletionTimestamp" not in p["metadata"]
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def condition(csd: dict, type_: str) -> dict:
    return next(c for c in csd.get("status", {}).get("conditions", []) if c["type"] == type_)


def wait_ready(name: str, namespace: str, replicas: int, timeout: float = 90) -> dict:
    """Wait until status says `replicas` ready for the current generation."""
    def ready():
        csd = get("csd", name, namespace)
        st = csd.get("status", {})
        return (
            st.get("observedGeneration") == csd["metadata"]["generation"]
            and st.get("readyReplicas") == replicas == st.get("replicas")
            and condition(csd, "Ready")["status"] == ("True" if replicas else "False")
            and condition(csd, "Progressing")["status"] == "False"
            and len(ready_pods(name, namespace)) == replicas
            and csd
        )
    return wait_for(f"{name} to have {replicas} ready replicas", ready, timeout=timeout)


@pytest.fixture
def cpu_example(operator, namespace):
    apply(example("cpu-builtin.yaml"), namespace)
    wait_ready("smollm2-cpu", namespace, 2)
    return "smollm2-cpu", namespace


def test_operator_runs_as_the_charts_service_account_with_least_rights(operator):
    sa = f"system:serviceaccount:{RELEASE_NS}:{SERVICE_ACCOUNT}"
    def can(*args):
        return kubectl("auth", "can-i", *args, f"--as={sa}", check=False).stdout.strip()
    assert can("patch", "deployments.apps", "-n", "default") == "yes"
    assert can("patch", "chatstreamdeployments.chatstream.io/status", "-n", "default") == "yes"
    for verb, what in [("delete", "deployments.apps"), ("get", "secrets"), ("delete", "chatstreamdeployments.chatstream.io"),
                       ("create", "pods"), ("update", "deployments.apps")]:
        assert can(verb, what, "-n", "default") == "no", (verb, what)
    # The operator's own liveness endpoint answers, and its logs are JSON.
    assert operator.alive()
    assert operator.records(), "no log lines"


def test_cpu_example_yields_deployment_service_and_ready_pods(cpu_example):
    name, ns = cpu_example
    dep = get("deployment", name, ns)
    svc = get("service", name, ns)
    csd = get("csd", name, ns)
    assert dep["spec"]["replicas"] == 2
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ChatStreamDeployment", name, csd["metadata"]["uid"], True)
    assert svc["metadata"]["ownerReferences"][0]["uid"] == csd["metadata"]["uid"]

    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "localhost/chatstream:0.1.0"
    assert container["command"] == ["chatstream", "serve"]
    env = env_of(dep)
    assert env["CHATSTREAM_MODEL"] == "builtin:smollm2-135m-instruct"
    assert env["CHATSTREAM_DEVICE"] == "cpu" and env["CHATSTREAM_DTYPE"] == "float32"
    assert env["CHATSTREAM_MAX_CONCURRENT"] == "4" and env["CHATSTREAM_MAX_QUEUE"] == "16"
    assert env["CHATSTREAM_MAX_NEW_TOKENS"] == "256" and env["CHATSTREAM_CONTEXT_LENGTH"] == "2048"
    assert env["CHATSTREAM_PORT"] == "8000"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and env["OTEL_TRACES_SAMPLER_ARG"] == "0.5"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    assert env["CHATSTREAM_SESSION_SECRET"] == {"secretKeyRef": {"name": f"{name}-session", "key": "secret"}}
    assert get("secret", f"{name}-session", ns)["data"]["secret"]

    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # room for a slow model load
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > 60  # longer than the service's shutdown grace
    assert svc["spec"]["ports"][0]["port"] == 8000

    # Pods run on kwok's CPU nodes; status and printer columns show it.
    nodes = {p["spec"]["nodeName"] for p in ready_pods(name, ns)}
    assert nodes <= {"kwok-cpu-0", "kwok-cpu-1"}
    status = get("csd", name, ns)["status"]
    assert status["endpoint"] == f"http://{name}.{ns}.svc:8000"
    selected = get_list("pods", ns, status["selector"])
    assert {p["metadata"]["name"] for p in selected} == {p["metadata"]["name"] for p in ready_pods(name, ns)}
    assert condition(get("csd", name, ns), "Degraded")["status"] == "False"
    table = kubectl("get", "csd", name, "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "REPLICAS", "READY", "CONCURRENCY", "AGE"]
    assert table[1].split()[:5] == [name, "builtin:smollm2-135m-instruct", "2", "2", "4"]


def test_gpu_example_asks_for_a_gpu_and_lands_on_the_gpu_node(operator, namespace):
    kubectl("create", "secret", "generic", "chat-redis", "-n", namespace, "--from-literal=url=redis://redis:6379/0")
    apply(example("gpu-hub.yaml"), namespace)
    wait_ready("qwen-gpu", namespace, 1)
    dep = get("deployment", "qwen-gpu", namespace)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "localhost/chatstream-gpu:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = env_of(dep)
    assert env["CHATSTREAM_MODEL"] == "hf:Qwen/Qwen2.5-1.5B-Instruct" and env["CHATSTREAM_REVISION"] == "main"
    assert env["CHATSTREAM_DEVICE"] == "cuda" and env["CHATSTREAM_DTYPE"] == "bfloat16"
    assert env["CHATSTREAM_SESSION_STORE"] == "redis"
    assert env["CHATSTREAM_REDIS_URL"] == {"secretKeyRef": {"name": "chat-redis", "key": "url"}}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    assert env["CHATSTREAM_QUEUE_FULL_STATUS"] == "429"  # spec.env reaches the pod
    assert env["CHATSTREAM_SHUTDOWN_GRACE_SECONDS"] == "120"
    # The GPU node is tainted; only a pod that tolerates it and asks for a GPU lands there.
    [pod] = ready_pods("qwen-gpu", namespace)
    assert pod["spec"]["nodeName"] == "kwok-gpu-0"
    assert get("service", "qwen-gpu", namespace)["spec"]["sessionAffinity"] == "None"


def test_kubectl_scale_resizes_without_rolling_pods(cpu_example):
    name, ns = cpu_example
    before = {p["metadata"]["name"] for p in ready_pods(name, ns)}
    kubectl("scale", "csd", name, "-n", ns, "--replicas=3")
    csd = wait_ready(name, ns, 3)
    assert get("deployment", name, ns)["spec"]["replicas"] == 3
    after = {p["metadata"]["name"] for p in ready_pods(name, ns)}
    assert before < after, "scaling replaced pods instead of adding one"
    scale = json.loads(kubectl("get", "--raw", f"/apis/chatstream.io/v1alpha1/namespaces/{ns}/chatstreamdeployments/{name}/scale").stdout)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == csd["status"]["selector"]
    kubectl("scale", "csd", name, "-n", ns, "--replicas=0")
    csd = wait_ready(name, ns, 0)
    assert condition(csd, "Ready")["reason"] == "ScaledToZero"


def test_spec_change_rolls_the_pods(cpu_example):
    name, ns = cpu_example
    before = {p["metadata"]["name"] for p in ready_pods(name, ns)}
    kubectl("patch", "csd", name, "-n", ns, "--type=merge", "-p", '{"spec": {"concurrency": {"maxConcurrentStreams": 8}}}')
    csd = wait_ready(name, ns, 2)
    assert csd["metadata"]["generation"] == 2 == csd["status"]["observedGeneration"]
    assert env_of(get("deployment", name, ns))["CHATSTREAM_MAX_CONCURRENT"] == "8"
    after = {p["metadata"]["name"] for p in ready_pods(name, ns)}
    assert not before & after, "old pods still serve after a spec change"
    table = kubectl("get", "csd", name, "-n", ns).stdout.splitlines()
    assert table[1].split()[4] == "8"


def test_deleting_the_resource_removes_its_children(cpu_example):
    name, ns = cpu_example
    kubectl("delete", "csd", name, "-n", ns, "--wait=true")
    gone = lambda: not any(get(kind, n, ns) for kind, n in [("deployment", name), ("service", name), ("secret", f"{name}-session")])
    wait_for("the garbage collector to remove the children", gone, timeout=60)
    wait_for("the pods to go", lambda: not get_list("pods", ns, SELECTOR.format(name)), timeout=60)


def test_operator_restart_changes_nothing(cpu_example, operator):
    name, ns = cpu_example
    kinds = [("deployment", name), ("service", name), ("secret", f"{name}-session")]

    def snapshot():
        return {k: (o["metadata"]["uid"], o["metadata"]["resourceVersion"]) for k, n in kinds if (o := get(k, n, ns))}

    before = snapshot()
    assert len(before) == 3
    operator.stop()
    operator.start()

    def resumed():
        return any(r.get("message") == "Handler 'reconcile' succeeded." and r.get("object", {}).get("name") == name
                   and r.get("object", {}).get("namespace") == ns for r in operator.records())
    wait_for("the restarted operator to resume the resource", resumed, timeout=60)
    assert snapshot() == before
    assert len(get_list("deployments", ns)) == 1 and len(get_list("services", ns)) == 1


def test_pods_that_cannot_be_created_show_as_degraded(operator, namespace):
    kubectl("create", "quota", "no-pods", "-n", namespace, "--hard=pods=0")
    apply({"apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment", "metadata": {"name": "starved"},
           "spec": {"model": {"source": "builtin:smollm2-135m-instruct"}}}, namespace)

    def degraded():
        csd = get("csd", "starved", namespace)
        cond = next((c for c in csd.get("status", {}).get("conditions", []) if c["type"] == "Degraded"), {})
        return cond.get("status") == "True" and cond
    cond = wait_for("the Degraded condition", degraded, timeout=60)
    assert cond["reason"] == "FailedCreate" and "quota" in cond["message"]
    assert condition(get("csd", "starved", namespace), "Ready")["status"] == "False"
    # `kubectl wait` works on the conditions, as users script it.
    kubectl("wait", "--for=condition=Degraded", "csd/starved", "-n", namespace, "--timeout=5s")


def test_operator_logs_are_json_without_permission_errors(operator):
    """Runs last in this module: whatever the operator did so far, its
    ServiceAccount was allowed to, and every log line was structured."""
    records = operator.records()  # raises if a line is not JSON
    assert all({"message", "severity", "timestamp"} <= r.keys() for r in records)
    denied = [r["message"] for r in records if "forbidden: User" in r["message"] or "cannot list resource" in r["message"]]
    assert not denied, denied[:3]
