"""Where a pod's model comes from: the image, the hub, or a model cache.

- `builtin:` models are baked into the CPU image; an init container copies
  them into the pod's writable cache (an emptyDir).
- `hf:` models without `spec.model.cache` are downloaded by every pod when
  it starts (HF_HOME in that emptyDir), with `spec.model.tokenSecretRef` as
  HF_TOKEN.
- `hf:` models with `spec.model.cache` live on a PersistentVolumeClaim (the
  user's, or one the operator makes), filled once per model and revision by
  a Job (`chatstream prepare-model`: huggingface_hub's snapshot_download into
  the claim, then a ready file, written last). The pods mount the claim
  read-only, wait in an init container for the ready file, and load the
  model with HF_HUB_OFFLINE=1: no pod downloads, none needs the token.

Pure functions, like resources.py: what the pods, the claim and the Job look
like, and what the status says about the fill (docs/operator.md, Model
cache). The Job and the claim are built from the Deployment's manifest (its
metadata, image and pod security), so this module needs nothing from
resources.py, which imports it for the pods' part.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

CACHE_DIR = "/var/cache/chatstream"  # the pod's writable cache (an emptyDir)
# Where the service images keep models converted at build time (see
# service/Dockerfile); an init container seeds the pod's cache from there.
BAKED_MODELS_DIR = "/opt/chatstream/models"
MOUNT = "/var/cache/chatstream-models"  # the claim: read-only in the pods, written by the fill Job
HUB_CACHE = f"{MOUNT}/hub"  # HF_HUB_CACHE: huggingface_hub's own layout (models--ORG--NAME/...)
READY_DIR = f"{MOUNT}/ready"  # one file per model and revision, written when its fill is complete
VOLUME = "model-cache"
FILL_CONTAINER = "fill"
FILL_NAME = "chatstream-model-cache"  # app.kubernetes.io/name of the fill pods (never the Service's pods)
CONDITION = "ModelCached"
TOKEN_KEY = "token"
FILL_BACKOFF_LIMIT = 4
EXIT_FINAL = 2  # prepare-model's exit code when another try cannot help (podFailurePolicy: FailJob)
WAIT_POLL_SECONDS = 2
# What the operator watches besides resources.py's children: the claim and the fill Jobs.
CHILDREN = [("", "v1", "persistentvolumeclaims"), ("batch", "v1", "jobs")]
SMALL = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}


class CacheState(NamedTuple):
    """What status.compute is told about the cache: its condition, and a
    failure (reason, message) that makes the resource Degraded, or None."""

    condition: dict
    failure: tuple[str, str] | None


def cache_of(spec: dict) -> dict | None:
    """spec.model.cache, for an hf: source (the CRD refuses it for others)."""
    model = spec["model"]
    return model.get("cache") if model["source"].startswith("hf:") else None


def token_ref(spec: dict) -> dict | None:
    ref = spec["model"].get("tokenSecretRef")
    return {"name": ref["name"], "key": ref.get("key", TOKEN_KEY)} if ref else None


def _repo_and_revision(spec: dict) -> tuple[str, str]:
    model = spec["model"]
    return model["source"].removeprefix("hf:"), model.get("revision", "main")


def _digest(*parts: str, length: int) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:length]


def claim_name(body: dict) -> str:
    cache = cache_of(body["spec"]) or {}
    return cache.get("claimName") or f"{body['metadata']['name']}-model-cache"


def ready_file(spec: dict) -> str:
    """The file whose existence says that this model and revision are in the
    cache, complete. The revision is hashed: a branch name may hold '/'."""
    repo, revision = _repo_and_revision(spec)
    return f"{READY_DIR}/{repo.replace('/', '--')}--{_digest(repo, revision, length=12)}.json"


def fill_job_name(body: dict) -> str:
    """One Job per model, revision, claim and token: a Job's pod template
    cannot change, so a change of any of those makes a new Job (which finds
    the ready file, if the model is there already, and ends in seconds)."""
    spec = body["spec"]
    ref = token_ref(spec) or {}
    key = _digest(*_repo_and_revision(spec), claim_name(body), ref.get("name", ""), ref.get("key", ""), length=10)
    return f"{body['metadata']['name'][:40]}-fill-{key}"


# --- the pods --------------------------------------------------------------

def env(spec: dict) -> list[dict]:
    """Variables the model container gets (before spec.env, which wins)."""
    if cache_of(spec) is not None:
        return [{"name": "HF_HUB_CACHE", "value": HUB_CACHE}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    ref = token_ref(spec)
    if ref and spec["model"]["source"].startswith("hf:"):  # the pods download, so they need the token
        return [_token_env(ref)]
    return []


def _token_env(ref: dict) -> dict:
    return {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}}}


def mounts(spec: dict) -> list[dict]:
    if cache_of(spec) is None:
        return []
    return [{"name": VOLUME, "mountPath": MOUNT, "readOnly": True}]


def volumes(body: dict) -> list[dict]:
    if cache_of(body["spec"]) is None:
        return []
    return [{"name": VOLUME, "persistentVolumeClaim": {"claimName": claim_name(body), "readOnly": True}}]


def init_containers(body: dict, container: dict) -> list[dict]:
    """What runs before the model container: the builtin model's copy from
    the image, or the wait for the cache's ready file."""
    spec = body["spec"]
    base = {"image": container["image"], "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": container["securityContext"]}
    if "imagePullPolicy" in container:
        base["imagePullPolicy"] = container["imagePullPolicy"]
    if spec["model"]["source"].startswith("builtin:"):
        # Images without baked models skip the copy (the server converts once).
        script = f"if [ -d {BAKED_MODELS_DIR} ]; then cp -a {BAKED_MODELS_DIR} {CACHE_DIR}/; fi"
        return [{"name": "seed-cache", **base, "command": ["sh", "-c", script],
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                 "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}]}]
    if cache_of(spec) is None:
        return []
    repo, revision = _repo_and_revision(spec)
    ready = ready_file(spec)
    # A line now and every minute while waiting: `kubectl logs POD -c wait-for-cache` says what for.
    script = (
        f'n=0; until [ -f "{ready}" ]; do '
        f'[ $((n % {60 // WAIT_POLL_SECONDS})) -eq 0 ] && echo "waiting for job {fill_job_name(body)} to fill '
        f'{repo}@{revision} into claim {claim_name(body)} ({ready})"; '
        f"n=$((n + 1)); sleep {WAIT_POLL_SECONDS}; done; "
        f'echo "in the cache: $(tr -d "\\n" < "{ready}")"'
    )
    return [{"name": "wait-for-cache", **base, "command": ["sh", "-c", script], "resources": SMALL,
             "volumeMounts": mounts(spec)}]


# --- the claim and the fill Job --------------------------------------------

def _child_metadata(deployment: dict, name: str) -> dict:
    meta = deployment["metadata"]
    return {"name": name, "namespace": meta["namespace"], "labels": dict(meta["labels"]),
            "ownerReferences": meta["ownerReferences"]}


def claim(body: dict, deployment: dict) -> dict | None:
    """The PersistentVolumeClaim the operator makes for `cache.size` (None
    when the user names one, or there is no cache). Owned by the resource:
    deleting the resource deletes the cache; a cache that outlives it is a
    claim of the user's."""
    cache = cache_of(body["spec"])
    if cache is None or cache.get("claimName"):
        return None
    spec = {"accessModes": list(cache.get("accessModes") or ["ReadWriteOnce"]),
            "resources": {"requests": {"storage": cache["size"]}}}
    if "storageClassName" in cache:
        spec["storageClassName"] = cache["storageClassName"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _child_metadata(deployment, claim_name(body)), "spec": spec}


def fill_labels(name: str) -> dict:
    return {"app.kubernetes.io/name": FILL_NAME, "app.kubernetes.io/instance": name}


def fill_job(body: dict, deployment: dict) -> dict | None:
    """The Job that puts the model into the cache, or None without a cache.
    Its pod runs the model pods' image with their pod security, on the nodes
    they may use (a node-local volume is filled where it is read), with
    spec.env (proxies, HF_ENDPOINT for a hub mirror) and the token."""
    spec = body["spec"]
    if cache_of(spec) is None:
        return None
    name, template = body["metadata"]["name"], deployment["spec"]["template"]["spec"]
    model_container = template["containers"][0]
    revision = _repo_and_revision(spec)[1]
    generated = [{"name": "HF_HUB_CACHE", "value": HUB_CACHE}, {"name": "HF_HOME", "value": "/tmp/huggingface"}]
    if token_ref(spec):
        generated.append(_token_env(token_ref(spec)))
    overrides = {e["name"]: e for e in spec.get("env") or []}
    container = {
        "name": FILL_CONTAINER,
        "image": model_container["image"],
        "command": ["chatstream", "prepare-model", "--model", spec["model"]["source"], "--revision", revision,
                    "--ready-file", ready_file(spec)],
        "env": [overrides.pop(e["name"], e) for e in generated] + list(overrides.values()),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": model_container["securityContext"],
        "volumeMounts": [{"name": VOLUME, "mountPath": MOUNT}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    if "imagePullPolicy" in model_container:
        container["imagePullPolicy"] = model_container["imagePullPolicy"]
    pod = {
        "restartPolicy": "Never",
        "containers": [container],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # The claim is written as the pods' group; a full volume is not walked again on every fill.
        "securityContext": {**template["securityContext"], "fsGroupChangePolicy": "OnRootMismatch"},
        "volumes": [{"name": VOLUME, "persistentVolumeClaim": {"claimName": claim_name(body)}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    for key in ("nodeSelector", "tolerations"):
        if key in template:
            pod[key] = template[key]
    labels = fill_labels(name)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _child_metadata(deployment, fill_job_name(body)),
        "spec": {
            "backoffLimit": FILL_BACKOFF_LIMIT,
            # No such repo or revision, no access: prepare-model exits EXIT_FINAL and the Job fails at once.
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": FILL_CONTAINER, "operator": "In",
                                                      "values": [EXIT_FINAL]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "template": {"metadata": {"labels": {**labels, **{k: v for k, v in deployment["metadata"]["labels"].items()
                                                           if k not in labels}}},
                         "spec": pod},
        },
    }


def fill_pod_selector(body: dict) -> str:
    """The pods of the current fill Job (the Job controller labels them)."""
    return f"batch.kubernetes.io/job-name={fill_job_name(body)}"


def owner_of(pod: dict) -> str | None:
    """The resource a fill pod works for (its controller is the Job)."""
    pod_labels = (pod.get("metadata") or {}).get("labels") or {}
    return pod_labels.get("app.kubernetes.io/instance") if pod_labels.get("app.kubernetes.io/name") == FILL_NAME else None


# --- status ----------------------------------------------------------------

def _job_condition(job: dict, type_: str) -> dict | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def state(body: dict, job: dict | None, claim_obj: dict | None, fill_failure: tuple[str, str] | None) -> CacheState | None:
    """The ModelCached condition, and a failure for Degraded: the fill Job
    failed (its pods' last message), or its pod cannot run (a missing token
    Secret, a crash) while the Job still tries. None without a cache, or when
    the Job was not read (the reconcile failed before)."""
    spec = body["spec"]
    if cache_of(spec) is None or job is None:
        return None
    repo, revision = _repo_and_revision(spec)
    name, what = job["metadata"]["name"], f"{repo}@{revision} in claim {claim_name(body)}"

    def condition(ok: bool, reason: str, message: str) -> dict:
        return {"type": CONDITION, "status": "True" if ok else "False", "reason": reason, "message": message,
                "observedGeneration": body["metadata"].get("generation", 0)}

    if _job_condition(job, "Complete"):
        return CacheState(condition(True, "Filled", f"{what}, filled by job {name}"), None)
    failed = _job_condition(job, "Failed")
    if failed:
        detail = fill_failure[1] if fill_failure else failed.get("message", "")
        message = (f"job {name} could not fill {what}: {detail} ({failed.get('reason', 'Failed')}; "
                   f"kubectl delete job {name} to try again)")
        return CacheState(condition(False, "FillFailed", message), ("CacheFillFailed", message))
    message = f"job {name} is filling {what} (progress: kubectl logs -f job/{name})"
    phase = ((claim_obj or {}).get("status") or {}).get("phase")
    if phase and phase != "Bound":
        message += f"; claim {claim_name(body)} is {phase} (no volume bound to it yet)"
    failure = (fill_failure[0], f"model cache fill: {fill_failure[1]}") if fill_failure else None
    return CacheState(condition(False, "Filling", message), failure)
