"""ChatStreamDeployment -> the Kubernetes objects that run it.

Pure functions: a resource (a plain dict, as the API server stores it, with the
CRD's defaults filled in) goes in, manifests come out. Nothing here talks to
the cluster, so every rule about what the pods look like is unit-testable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from chatstream import envvars
from chatstream.settings import TABLE

from . import model_cache, security
from .model_cache import BAKED_MODELS_DIR, CACHE_DIR  # noqa: F401 (where they were first defined)

GROUP = "chatstream.io"
VERSION = "v1alpha1"
KIND = "ChatStreamDeployment"
PLURAL = "chatstreamdeployments"

PORT = 8000
MANAGER = "chatstream-operator"
SPEC_HASH_ANNOTATION = f"{GROUP}/spec-hash"
GENERATION_ANNOTATION = f"{GROUP}/generation"
GPU = "nvidia.com/gpu"
SESSION_SECRET_KEY = "secret"
# Every child carries this label; the operator watches only what has it.
MANAGED_BY = {"app.kubernetes.io/managed-by": MANAGER}

# spec.auth.apiKeysSecretRef is mounted here (a volume, not an env var: the
# kubelet updates a mounted Secret in place, and the server reads it again).
API_KEYS_DIR = "/etc/chatstream/api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/keys"
PRESTOP_SLEEP_SECONDS = 5
# Model loading can take minutes (a hub download, a GGUF conversion): the
# startup probe gives it this long before the kubelet restarts the container.
STARTUP_BUDGET_SECONDS = 900
STARTUP_PERIOD_SECONDS = 5
UID = 10001
CONTAINER = "chatstream"  # the model container's name

DEFAULT_RESOURCES = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}


@dataclass(frozen=True)
class Images:
    """The operator's default service images (a spec's `image` wins)."""

    cpu: str = "localhost/chatstream:0.1.0"
    gpu: str = "localhost/chatstream-gpu:0.1.0"
    router: str = "localhost/chatstream-router:0.1.0"  # the session-affine router (router.py)
    activator: str = "localhost/chatstream-operator:0.1.0"  # beside it with autoscaling (activation.py)


def labels(name: str) -> dict[str, str]:
    """Labels that select one resource's pods (also the status selector)."""
    return {"app.kubernetes.io/name": "chatstream", "app.kubernetes.io/instance": name}


def selector(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels(name).items()))


def owner_of(child: dict) -> str | None:
    """The name of the ChatStreamDeployment that controls `child` (same
    namespace), or None. Deployments, Services and Secrets name it in their
    controller ownerReference; pods (owned by a ReplicaSet) in their
    instance label."""
    meta = child.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/") and ref.get("controller"):
            return ref.get("name")
    pod_labels = meta.get("labels") or {}
    if child.get("kind", "Pod") == "Pod" and pod_labels.get("app.kubernetes.io/name") == "chatstream":
        return pod_labels.get("app.kubernetes.io/instance")
    return None


def endpoint(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc:{PORT}"


def spec_hash(spec: dict) -> str:
    """Hash of everything in spec that shapes a pod: not replicas (scaling never
    rolls pods), nor routing and autoscaling (they shape only the router)."""
    shaped = {k: v for k, v in spec.items() if k not in ("replicas", "routing", "autoscaling")}
    return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]


def session_secret_name(name: str) -> str:
    return f"{name}-session"


def session_secret_copy_name(name: str) -> str:
    return f"{name}-session-copy"


def wants_gpu(spec: dict) -> bool:
    res = spec.get("resources") or {}
    asked = GPU in (res.get("limits") or {}) or GPU in (res.get("requests") or {})
    return asked or spec["model"]["device"] == "cuda"


def _owner(body: dict) -> dict:
    meta = body["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(body: dict, name: str) -> dict:
    meta = body["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": {**labels(meta["name"]), **MANAGED_BY},
        "ownerReferences": [_owner(body)],
    }


# Rows of the settings table whose CRD field is a reference, not a value: a Secret mounted as a file.
MOUNTED_FIELDS = {"auth.apiKeysSecretRef"}


def _field(spec: dict, path: str):
    for key in path.split("."):
        spec = spec.get(key) if isinstance(spec, dict) else None
    return spec


def settings_env(spec: dict) -> list[dict]:
    """Every setting whose row in the server's table (chatstream/settings.py) names a CRD field, from that
    field, where the spec has it: the table is the one list of which field sets which variable."""
    return [{"name": row.env, "value": str(value)} for row in TABLE
            if row.crd and row.crd not in MOUNTED_FIELDS and (value := _field(spec, row.crd)) is not None]


def _env(body: dict) -> list[dict]:
    """Service settings as environment variables; spec.env entries replace
    generated ones of the same name and come after them."""
    meta, spec = body["metadata"], body["spec"]
    env = settings_env(spec) + [
        {"name": envvars.HOST, "value": "0.0.0.0"},
        {"name": envvars.PORT, "value": str(PORT)},
        {"name": envvars.CACHE_DIR, "value": CACHE_DIR},
        {
            "name": envvars.SESSION_SECRET,
            "valueFrom": {"secretKeyRef": {"name": session_secret_name(meta["name"]), "key": SESSION_SECRET_KEY}},
        },
        {"name": envvars.OTEL_SERVICE_NAME, "value": meta["name"]},
        # Which pod a span came from, in the OpenTelemetry k8s resource
        # conventions: a trace backend tells the replicas apart by these.
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": envvars.OTEL_RESOURCE_ATTRIBUTES,
         "value": f"k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),k8s.deployment.name={meta['name']}"},
        # The model's threads follow what the pod was given (chatstream/threads.py): its CPU
        # request, in millicores, from the downward API (a limit the server reads from its cgroup).
        {"name": envvars.CPU_REQUEST, "valueFrom": {"resourceFieldRef": {
            "containerName": CONTAINER, "resource": "requests.cpu", "divisor": "1m"}}},
        # Hub downloads need a writable home; the root filesystem is read-only.
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
    ]
    env += model_cache.env(spec)  # the model cache or the hub token (model_cache.py)
    if api_keys_ref(spec):
        env.append({"name": envvars.API_KEYS_FILE, "value": API_KEYS_FILE})
    if spec["sessions"]["store"] == "redis":
        ref = spec["sessions"]["redisURLSecretRef"]
        env.append({"name": envvars.REDIS_URL,
                    "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref.get("key", "url")}}})
    tracing = spec.get("tracing")
    if tracing is not None:
        if "otlpEndpoint" in tracing:
            env.append({"name": envvars.OTEL_EXPORTER_OTLP_ENDPOINT, "value": tracing["otlpEndpoint"]})
            env.append({"name": envvars.OTEL_EXPORTER_OTLP_PROTOCOL, "value": "http/protobuf"})
        env.append({"name": envvars.OTEL_TRACES_SAMPLER, "value": "parentbased_traceidratio"})
        env.append({"name": envvars.OTEL_TRACES_SAMPLER_ARG, "value": str(tracing["samplingRatio"])})
    overrides = {e["name"]: e for e in spec.get("env") or []}
    return [overrides.pop(e["name"], e) for e in env] + list(overrides.values())


def api_keys_ref(spec: dict) -> dict | None:
    """spec.auth.apiKeysSecretRef with its key defaulted, or None when no keys are asked for."""
    ref = (spec.get("auth") or {}).get("apiKeysSecretRef")
    return {"name": ref["name"], "key": ref.get("key", "keys")} if ref else None


def _api_keys_volume(ref: dict) -> dict:
    # Only the named key, as the file the server reads; readable by the pod's group (fsGroup) only.
    return {"name": "api-keys", "secret": {"secretName": ref["name"], "items": [{"key": ref["key"], "path": "keys"}],
                                           "defaultMode": 0o440}}


def _resources(spec: dict) -> dict:
    res = spec.get("resources") or DEFAULT_RESOURCES
    limits = dict(res.get("limits") or {})
    requests = dict(res.get("requests") or {})
    if wants_gpu(spec):
        # Extended resources are set in limits (requests default to them).
        limits[GPU] = limits.get(GPU) or requests.pop(GPU, None) or 1
        requests.pop(GPU, None)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(path: str, period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _container(body: dict, images: Images) -> dict:
    spec = body["spec"]
    container = {
        "name": CONTAINER,
        "image": spec.get("image") or (images.gpu if wants_gpu(spec) else images.cpu),
        "command": ["chatstream", "serve"],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": _env(body),
        "resources": _resources(spec),
        "startupProbe": _probe("/readyz", STARTUP_PERIOD_SECONDS, STARTUP_BUDGET_SECONDS // STARTUP_PERIOD_SECONDS),
        "readinessProbe": _probe("/readyz", 5, 3),
        "livenessProbe": _probe("/healthz", 10, 3),
        # The Service stops sending new requests only after the endpoint
        # removal has propagated; the sleep covers that window, then SIGTERM
        # lets the server finish its streams in flight.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        # A model that cannot load makes the server exit after writing the
        # loader's message to /dev/termination-log; the kubelet shows it in
        # lastState.terminated.message (the end of the log when the file is
        # empty) and the operator reports it as Degraded (status.py).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": security.locked_down(),
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ] + model_cache.mounts(spec),
    }
    if api_keys_ref(spec):
        container["volumeMounts"].append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    if "imagePullPolicy" in spec:
        container["imagePullPolicy"] = spec["imagePullPolicy"]
    return container


def _tolerations(spec: dict) -> list[dict]:
    tolerations = list(spec.get("tolerations") or [])
    if wants_gpu(spec) and not any(t.get("key") == GPU for t in tolerations):
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule.
        tolerations.append({"key": GPU, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def deployment(body: dict, images: Images = Images()) -> dict:
    """The Deployment that runs the pods. Its replicas follow spec.replicas,
    so `kubectl scale csd` and autoscalers acting on the resource both work."""
    meta, spec = body["metadata"], body["spec"]
    name = meta["name"]
    container = _container(body, images)
    pod_spec = {
        "containers": [container],
        "terminationGracePeriodSeconds": spec["shutdownGraceSeconds"] + PRESTOP_SLEEP_SECONDS + 10,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        ] + model_cache.volumes(body),
    }
    if api_keys_ref(spec):
        pod_spec["volumes"].append(_api_keys_volume(api_keys_ref(spec)))
    if init := model_cache.init_containers(body, container):  # the builtin model's copy, the cache's wait
        pod_spec["initContainers"] = init
    if spec.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(spec["nodeSelector"])
    tolerations = _tolerations(spec)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    metadata = _metadata(body, name)
    metadata["annotations"] = {GENERATION_ANNOTATION: str(meta.get("generation", 0))}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec["replicas"],
            "selector": {"matchLabels": labels(name)},
            # Never take a serving pod away before its replacement is ready.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "progressDeadlineSeconds": STARTUP_BUDGET_SECONDS + 300,
            "template": {
                "metadata": {
                    "labels": labels(name),
                    "annotations": {SPEC_HASH_ANNOTATION: spec_hash(spec)},
                },
                "spec": pod_spec,
            },
        },
    }


def service(body: dict) -> dict:
    """A ClusterIP Service in front of the pods. With in-pod (memory)
    sessions, clients are pinned to one pod so their conversation follows them."""
    name = body["metadata"]["name"]
    spec = {
        "type": "ClusterIP",
        "selector": labels(name),
        "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        "sessionAffinity": "ClientIP" if body["spec"]["sessions"]["store"] == "memory" else "None",
    }
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(body, name), "spec": spec}


def _secret(body: dict, name: str, value: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(body, name),
        "type": "Opaque",
        # Nobody (the operator included) can change the value in place.
        "immutable": True,
        "stringData": {SESSION_SECRET_KEY: value},
    }


def session_secret(body: dict, value: str) -> dict:
    """The cookie-signing secret shared by all pods of one resource, so a
    session cookie stays valid whichever pod answers. The pods read it by
    name (secretKeyRef)."""
    return _secret(body, session_secret_name(body["metadata"]["name"]), value)


def session_secret_copy(body: dict, value: str) -> dict:
    """A second Secret holding the same value: the record the session Secret
    is restored from if it is deleted while pods that were given the value
    still run (and the other way round)."""
    return _secret(body, session_secret_copy_name(body["metadata"]["name"]), value)


def session_secrets_to_create(body: dict, value: str | None, copy: str | None, fresh: str) -> list[dict]:
    """The session Secrets missing, given the values of those that exist
    (None: absent). A value, once it exists in either Secret, is the value:
    a new one (`fresh`, random, chosen by the caller) is used only when both
    are gone, as for a new resource."""
    keep = value or copy or fresh
    missing = []
    if value is None:
        missing.append(session_secret(body, keep))
    if copy is None:
        missing.append(session_secret_copy(body, keep))
    return missing
