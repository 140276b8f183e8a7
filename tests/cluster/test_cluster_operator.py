"""The operator against a real API server, with kwok nodes running the pods.

Each test applies a resource the way a user would and checks what a user
would look at: the Deployment and Service, the pods, status and
`kubectl get csd`.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
import yaml

from support.kube import RELEASE_NS, ROOT, SERVICE_ACCOUNT, apply, get, get_list, kubectl, wait_for

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
    # Session Secrets are read (to restore a deleted one with its value) but
    # never changed or removed by the operator.
    assert can("get", "secrets", "-n", "default") == "yes" and can("watch", "pods", "-n", "default") == "yes"
    for verb, what in [("delete", "deployments.apps"), ("update", "secrets"), ("delete", "secrets"),
                       ("patch", "secrets"), ("delete", "chatstreamdeployments.chatstream.io"),
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
    # Longer than the service's shutdown grace plus the preStop sleep.
    assert pod["terminationGracePeriodSeconds"] > csd["spec"]["shutdownGraceSeconds"] + 5
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
    assert table[0].split() == ["NAME", "MODEL", "REPLICAS", "READY", "CONCURRENCY", "ROUTING", "SCALING", "AGE"]
    assert table[1].split()[:6] == [name, "builtin:smollm2-135m-instruct", "2", "2", "4",
                                    f"http://{name}-router.{ns}.svc:8000"]


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
    kinds = [("deployment", name), ("service", name), ("secret", f"{name}-session"), ("secret", f"{name}-session-copy")]

    def snapshot():
        return {(k, n): (o["metadata"]["uid"], o["metadata"]["resourceVersion"]) for k, n in kinds if (o := get(k, n, ns))}

    before = snapshot()
    assert len(before) == 4
    status_before = get("csd", name, ns)["status"]
    operator.stop()
    operator.start()

    def resumed():
        return any(r.get("message") == "reconciled" and r.get("object", {}).get("name") == name
                   and r.get("object", {}).get("namespace") == ns for r in operator.records())
    wait_for("the restarted operator to resume the resource", resumed, timeout=60)
    assert snapshot() == before
    assert get("csd", name, ns)["status"] == status_before
    # The pods' Deployment and Service, and the router's (docs/routing.md).
    assert len(get_list("deployments", ns)) == 2 and len(get_list("services", ns)) == 3


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


def test_api_keys_secret_is_mounted_and_a_missing_one_is_reported(operator, namespace):
    """spec.auth.apiKeysSecretRef: the Secret is mounted as a file the server reads (a volume, so a
    rotated key reaches running pods); while it does not exist, status says so instead of pods waiting
    in ContainerCreating without a word."""
    apply({"apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment", "metadata": {"name": "keyed"},
           "spec": {"model": {"source": "builtin:smollm2-135m-instruct"},
                    "auth": {"apiKeysSecretRef": {"name": "keyed-api-keys"}}}}, namespace)

    def degraded(status: str):
        def check():
            csd = get("csd", "keyed", namespace)
            cond = next((c for c in csd.get("status", {}).get("conditions", []) if c["type"] == "Degraded"), {})
            return cond.get("status") == status and cond
        return check
    cond = wait_for("Degraded naming the missing Secret", degraded("True"), timeout=60)
    assert f"Secret {namespace}/keyed-api-keys" in cond["message"] and "'keys'" in cond["message"]
    pod = get("deployment", "keyed", namespace)["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert volume["secret"]["secretName"] == "keyed-api-keys"
    assert env_of(get("deployment", "keyed", namespace))["CHATSTREAM_API_KEYS_FILE"] == "/etc/chatstream/api-keys/keys"
    kubectl("create", "secret", "generic", "keyed-api-keys", "-n", namespace, "--from-literal=keys=k-1")
    took = time.monotonic()
    wait_for("Degraded to clear once the Secret exists", degraded("False"), timeout=60)
    print(f"\nDegraded cleared {time.monotonic() - took:.1f}s after the Secret was created")


def _recreated(kind: str, name: str, ns: str, old_uid: str):
    obj = get(kind, name, ns)
    return obj if obj and obj["metadata"]["uid"] != old_uid else None


def _time_to_return(kind: str, name: str, ns: str) -> tuple[float, dict]:
    """Delete a child the way a user would and time its return."""
    uid = get(kind, name, ns)["metadata"]["uid"]
    t0 = time.monotonic()
    kubectl("delete", kind, name, "-n", ns, "--wait=false")
    obj = wait_for(f"the {kind} to come back", lambda: _recreated(kind, name, ns, uid), timeout=60, interval=0.05)
    return time.monotonic() - t0, obj


def secret_value(name: str, ns: str) -> str:
    return base64.b64decode(get("secret", name, ns)["data"]["secret"]).decode()


def test_deleted_children_come_back_at_once(cpu_example):
    """Level-triggered: the operator watches its children, so a deleted
    Deployment or Service is back within seconds, not at the next resync."""
    name, ns = cpu_example
    took = {}
    for kind in ("deployment", "service"):
        took[kind], obj = _time_to_return(kind, name, ns)
        assert obj["metadata"]["ownerReferences"][0]["name"] == name
    print("\ndeleted child back after: " + ", ".join(f"{k} {v:.2f}s" for k, v in took.items()))
    assert all(v < 5 for v in took.values()), took
    wait_ready(name, ns, 2)


def test_a_drifted_deployment_is_put_back(cpu_example):
    name, ns = cpu_example
    kubectl("scale", "deployment", name, "-n", ns, "--replicas=5")
    kubectl("set", "env", f"deployment/{name}", "-n", ns, "CHATSTREAM_MAX_CONCURRENT=99")
    def restored():
        dep = get("deployment", name, ns)
        return dep["spec"]["replicas"] == 2 and env_of(dep)["CHATSTREAM_MAX_CONCURRENT"] == "4" and dep
    wait_for("the Deployment to be put back", restored, timeout=10, interval=0.1)
    wait_ready(name, ns, 2)


def test_a_deleted_session_secret_comes_back_with_the_same_value(cpu_example):
    """Pods that run keep the value they were given; a new pod must get the
    same one, or sessions signed by one pod fail on the other."""
    name, ns = cpu_example
    value = secret_value(f"{name}-session", ns)
    assert secret_value(f"{name}-session-copy", ns) == value
    took, secret = _time_to_return("secret", f"{name}-session", ns)
    print(f"\nsession Secret back after {took:.2f}s")
    assert secret_value(f"{name}-session", ns) == value and secret["immutable"] is True
    _time_to_return("secret", f"{name}-session-copy", ns)
    assert secret_value(f"{name}-session-copy", ns) == value
    assert took < 5


def test_a_session_secret_made_before_the_copy_existed_keeps_its_value(operator, namespace):
    """Upgrading from an operator that kept only NAME-session: the copy is
    made from it, and the value the pods run with stays."""
    kubectl("create", "secret", "generic", "legacy-session", "-n", namespace, "--from-literal=secret=legacy-value")
    apply({"apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment", "metadata": {"name": "legacy"},
           "spec": {"model": {"source": "builtin:smollm2-135m-instruct"}}}, namespace)
    wait_for("the copy", lambda: get("secret", "legacy-session-copy", namespace), timeout=30)
    assert secret_value("legacy-session-copy", namespace) == "legacy-value" == secret_value("legacy-session", namespace)


LOADER_ERROR = ("chatstream: cannot load model hf:nobody/no-such-model: "
                "We couldn't connect to 'https://huggingface.co' to load the files")


def crash_loop(pod: dict, message: str) -> dict:
    """The status the kubelet gives a container that wrote `message` to
    /dev/termination-log, exited 1 and is waiting out its restart back-off.
    kwok runs no containers, so the test writes it as the kubelet would
    (kwok leaves a pod alone once it has an IP)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    container = pod["spec"]["containers"][0]
    return {"status": {
        "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": now},
                       {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
                       {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                       {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}],
        "containerStatuses": [{
            "name": container["name"], "image": container["image"], "imageID": "", "ready": False,
            "restartCount": 2, "started": False,
            "state": {"waiting": {"reason": "CrashLoopBackOff",
                                  "message": f"back-off 20s restarting failed container={container['name']}"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": message,
                                         "startedAt": now, "finishedAt": now}},
        }],
    }}


def test_a_model_that_cannot_load_shows_as_degraded_with_the_loaders_message(operator, namespace):
    apply({"apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment", "metadata": {"name": "noload"},
           "spec": {"model": {"source": "hf:nobody/no-such-model"}}}, namespace)
    wait_ready("noload", namespace, 1)
    [pod] = get_list("pods", namespace, SELECTOR.format("noload"))
    assert pod["spec"]["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    t0 = time.monotonic()
    kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status", "--type=merge",
            "-p", json.dumps(crash_loop(pod, LOADER_ERROR)))

    def degraded():
        cond = condition(get("csd", "noload", namespace), "Degraded")
        return cond["status"] == "True" and cond
    cond = wait_for("the Degraded condition", degraded, timeout=30, interval=0.1)
    took = time.monotonic() - t0
    print(f"\nDegraded {took:.2f}s after the container's crash was reported: {cond['message']}")
    assert cond["reason"] == "CrashLoopBackOff" and LOADER_ERROR in cond["message"]
    assert condition(get("csd", "noload", namespace), "Ready")["status"] == "False"
    kubectl("wait", "--for=condition=Degraded", "csd/noload", "-n", namespace, "--timeout=5s")
    assert took < 10


def test_a_finalizer_left_by_an_earlier_version_is_removed(operator, namespace):
    """Earlier versions had a timer, for which kopf puts a finalizer on the
    resource; with that operator gone it would block deletion forever."""
    apply({"apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment",
           "metadata": {"name": "old", "finalizers": ["kopf.zalando.org/KopfFinalizerMarker"]},
           "spec": {"model": {"source": "builtin:smollm2-135m-instruct"}}}, namespace)
    wait_for("the finalizer to go", lambda: not get("csd", "old", namespace)["metadata"].get("finalizers"), timeout=30)
    kubectl("delete", "csd", "old", "-n", namespace, "--timeout=30s")


def test_operator_logs_are_json_without_permission_errors(operator):
    """Runs last in this module: whatever the operator did so far, its
    ServiceAccount was allowed to, and every log line was structured."""
    records = operator.records()  # raises if a line is not JSON
    assert all({"message", "severity", "timestamp"} <= r.keys() for r in records)
    denied = [r["message"] for r in records if "forbidden: User" in r["message"] or "cannot list resource" in r["message"]]
    assert not denied, denied[:3]
