"""The few Kubernetes API calls the operator makes (kubernetes client)."""

from __future__ import annotations

import base64
import json

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import resources

_APPLY = "application/apply-patch+yaml"
_MERGE = "application/merge-patch+json"
_JSON_PATCH = "application/json-patch+json"
# What apply() can write: kind -> (the client's API class, its server-side apply call).
_PATCH = {
    "Deployment": ("AppsV1Api", "patch_namespaced_deployment"),
    "Service": ("CoreV1Api", "patch_namespaced_service"),
    "ConfigMap": ("CoreV1Api", "patch_namespaced_config_map"),
    "PersistentVolumeClaim": ("CoreV1Api", "patch_namespaced_persistent_volume_claim"),
}


def login() -> None:
    """In-cluster credentials in a pod, $KUBECONFIG or ~/.kube/config outside."""
    kubernetes.config.load_config()


def _json(response) -> dict:
    return json.loads(response.data)


def _unless_absent(call, *args, **kw):
    """call(*args, **kw), or None when what it reads does not exist (404)."""
    try:
        return call(*args, **kw)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def apply(manifest: dict) -> dict:
    """Server-side apply as the operator's field manager. Applying what is
    already there writes nothing, so repeated reconciles (a restart, a
    timer) leave resourceVersions alone."""
    meta = manifest["metadata"]
    if manifest["kind"] not in _PATCH:
        raise ValueError(f"cannot apply a {manifest['kind']}")
    api, method = _PATCH[manifest["kind"]]
    patch = getattr(getattr(kubernetes.client, api)(), method)
    return _json(patch(meta["name"], meta["namespace"], manifest, field_manager=resources.MANAGER, force=True,
                       _content_type=_APPLY, _preload_content=False))


def create(manifest: dict) -> None:
    """Create a Secret; one that exists already (a race with another
    reconcile) is left as it is: Secrets are never rewritten."""
    try:
        kubernetes.client.CoreV1Api().create_namespaced_secret(manifest["metadata"]["namespace"], manifest)
    except ApiException as err:
        if err.status != 409:
            raise


def ensure_job(manifest: dict) -> dict:
    """The Job of that name as it is, created from `manifest` when missing.
    A Job's pod template cannot change, so one that exists is left alone
    (model_cache.py names Jobs after what they do)."""
    meta, api = manifest["metadata"], kubernetes.client.BatchV1Api()
    read = lambda: _json(api.read_namespaced_job(meta["name"], meta["namespace"], _preload_content=False))  # noqa: E731
    try:
        return read()
    except ApiException as err:
        if err.status != 404:
            raise
    try:
        return _json(api.create_namespaced_job(meta["namespace"], manifest, _preload_content=False))
    except ApiException as err:
        if err.status != 409:  # made meanwhile by another reconcile
            raise
    return read()


def secret_value(namespace: str, name: str, key: str) -> str | None:
    """The decoded value under `key`, or None when the Secret (or the key)
    does not exist or is being deleted."""
    resp = _unless_absent(kubernetes.client.CoreV1Api().read_namespaced_secret, name, namespace,
                          _preload_content=False)
    if resp is None:
        return None
    secret = _json(resp)
    if secret["metadata"].get("deletionTimestamp"):
        return None
    data = (secret.get("data") or {}).get(key)
    return base64.b64decode(data).decode() if data is not None else None


def list_pods(namespace: str, selector: str) -> list[dict]:
    resp = kubernetes.client.CoreV1Api().list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
    return _json(resp)["items"]


def get_resource(namespace: str, name: str) -> dict | None:
    return _unless_absent(kubernetes.client.CustomObjectsApi().get_namespaced_custom_object,
                          resources.GROUP, resources.VERSION, namespace, resources.PLURAL, name)


def replicas_patch(replicas: int, autoscaling: dict) -> list[dict]:
    """A JSON patch (RFC 6902) of spec.replicas that applies only while
    spec.autoscaling is still `autoscaling`, the one the decision rested on:
    its `test` fails (422) once a user removed or changed it, so a decision
    made just before can never overwrite a user's own replicas."""
    return [{"op": "test", "path": "/spec/autoscaling", "value": autoscaling},
            {"op": "add", "path": "/spec/replicas", "value": replicas}]


def patch_replicas(namespace: str, name: str, replicas: int, autoscaling: dict) -> bool:
    """spec.replicas of a ChatStreamDeployment: the autoscaler's one write
    (scaler.py). False when spec.autoscaling changed meanwhile: nothing written."""
    try:
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object(
            resources.GROUP, resources.VERSION, namespace, resources.PLURAL, name,
            replicas_patch(replicas, autoscaling), _content_type=_JSON_PATCH,
        )
    except ApiException as err:
        if err.status in (404, 422):  # gone, or the test failed: spec.autoscaling is not what was decided on
            return False
        raise
    return True


def patch_status(namespace: str, name: str, status: dict) -> None:
    api = kubernetes.client.CustomObjectsApi()
    try:
        api.patch_namespaced_custom_object_status(
            resources.GROUP, resources.VERSION, namespace, resources.PLURAL, name,
            {"status": status}, _content_type=_MERGE,
        )
    except ApiException as err:
        if err.status != 404:  # the resource went away meanwhile
            raise
