"""The status of a ChatStreamDeployment, computed from what is observed.

Pure: the status is a function of the resource, its Deployment, its pods and
the error of the last reconcile (if any), so a restarted operator reports the
same thing and a test can pin every case. `compute` is the only place that
decides what status says; handlers.py writes its result, and only there.
"""

from __future__ import annotations

from . import model_cache, resources, router

# Container waiting reasons that will not fix themselves without a change
# (the kubelet's names). A pod in one of these is failing, not starting.
FAILING_WAITING_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})
# The termination message can be up to 4 KiB; a condition stays readable.
MAX_MESSAGE = 2048


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> dict:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def _deployment_condition(deployment: dict, type_: str) -> dict:
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return {}


def _container_failure(cs: dict) -> tuple[str, str] | None:
    """(reason, message) when this container status shows a failure that
    restarts will not cure, else None. The message is the container's
    termination message where there is one: the service writes its loader's
    error there before it exits."""
    state, last = cs.get("state") or {}, cs.get("lastState") or {}
    waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
    failed_before = (last.get("terminated") or {}) if (last.get("terminated") or {}).get("exitCode", 0) != 0 else {}
    if terminated and terminated.get("exitCode", 0) != 0:
        exit_ = terminated
        reason = terminated.get("reason") or "Error"
    elif waiting.get("reason") in FAILING_WAITING_REASONS:
        exit_ = failed_before
        # Between restarts the kubelet says CrashLoopBackOff; the last exit says why (OOMKilled).
        reason = failed_before.get("reason") if failed_before.get("reason") not in (None, "Error", "Completed") \
            else waiting["reason"]
    elif failed_before and not cs.get("ready"):
        # Restarted after a failure and not ready yet: between two crashes.
        exit_ = failed_before
        reason = waiting.get("reason") or "RestartingAfterError"
    else:
        return None
    message = (exit_.get("message") or "").strip() or (waiting.get("message") or "").strip()
    details = [f"container {cs.get('name')}: {reason}"]
    if waiting.get("reason") and waiting["reason"] != reason:
        details.append(waiting["reason"])
    if exit_:
        details.append(f"exit code {exit_.get('exitCode')}")
    if cs.get("restartCount"):
        details.append(f"{cs['restartCount']} restarts")
    if message:
        message = message[-MAX_MESSAGE:]  # the end of a log holds the error
        return reason, f"{message} ({', '.join(details)})"
    return reason, ", ".join(details)


def pod_failure(pods: list[dict]) -> tuple[str, str] | None:
    """The first failing container among the pods (sorted by name, so the
    answer does not depend on list order), as (reason, message)."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        st = pod.get("status") or {}
        statuses = (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or [])
        for cs in statuses:
            found = _container_failure(cs)
            if found:
                reason, message = found
                return reason, f"pod {pod['metadata']['name']}: {message}"
        if st.get("phase") == "Failed":
            return st.get("reason") or "PodFailed", f"pod {pod['metadata']['name']}: {st.get('message', 'failed')}"
    return None


def _from_deployment(deployment: dict, failure: tuple[str, str] | None) -> tuple[dict, list[dict]]:
    meta, spec = deployment["metadata"], deployment["spec"]
    st = deployment.get("status") or {}
    generation = int((meta.get("annotations") or {}).get(resources.GENERATION_ANNOTATION, 0))
    want = spec.get("replicas", 1)
    have, ready = st.get("replicas", 0), st.get("readyReplicas", 0)
    updated, available = st.get("updatedReplicas", 0), st.get("availableReplicas", 0)
    seen = st.get("observedGeneration", 0) >= meta.get("generation", 0)

    rolled_out = seen and updated == want and have == want and available == want
    ready_ok = want > 0 and ready >= want and rolled_out and failure is None
    if want == 0:
        ready_c = _condition("Ready", False, "ScaledToZero", "spec.replicas is 0", generation)
    elif ready_ok:
        ready_c = _condition("Ready", True, "AllReplicasReady", f"{ready}/{want} replicas ready", generation)
    else:
        ready_c = _condition("Ready", False, "ReplicasNotReady", f"{ready}/{want} replicas ready", generation)

    if rolled_out:
        progressing_c = _condition("Progressing", False, "RolloutComplete", f"{updated}/{want} pods run the current spec", generation)
    else:
        progressing_c = _condition(
            "Progressing", True, "RollingOut", f"{updated}/{want} pods updated, {have} exist, {available} available", generation
        )

    stuck = _deployment_condition(deployment, "Progressing")
    replica_failure = _deployment_condition(deployment, "ReplicaFailure")
    if failure is not None:
        degraded_c = _condition("Degraded", True, failure[0], failure[1], generation)
    elif replica_failure.get("status") == "True":
        degraded_c = _condition("Degraded", True, replica_failure.get("reason") or "ReplicaFailure",
                                replica_failure.get("message", ""), generation)
    elif stuck.get("status") == "False" and stuck.get("reason") == "ProgressDeadlineExceeded":
        degraded_c = _condition("Degraded", True, "ProgressDeadlineExceeded", stuck.get("message", ""), generation)
    else:
        degraded_c = _condition("Degraded", False, "AsExpected", "no failures seen", generation)
    fields = {"replicas": have, "readyReplicas": ready, "observedGeneration": generation}
    return fields, [ready_c, progressing_c, degraded_c]


def _router_condition(router_deployment: dict, generation: int) -> dict:
    st = router_deployment.get("status") or {}
    ready = st.get("readyReplicas", 0)
    if ready >= 1:
        return _condition("RouterReady", True, "RouterReady", "the session-affine router has a ready pod", generation)
    # Not ready while it sees no ready model pod, or when its pod cannot run.
    return _condition("RouterReady", False, "RouterNotReady",
                      f"{ready}/{router_deployment['spec'].get('replicas', 1)} router pods ready", generation)


def compute(resource: dict, deployment: dict | None, pods: list[dict], error: str | None, now: str,
            router_deployment: dict | None = None, cache=None) -> dict:
    """The whole status of `resource`.

    deployment: the owned Deployment as last seen (None when the reconcile
    failed before it could be read); pods: the resource's pods; error: why
    the last reconcile failed, if it did; router_deployment: the router's
    Deployment as last seen (router.py), None when not read; cache: the
    model cache's model_cache.CacheState (its ModelCached condition, and a
    failed fill, which Degraded reports first), None without a cache or when
    not read (the condition is then kept as it was). Conditions keep
    their lastTransitionTime while their status holds (see `merge_conditions`)."""
    meta = resource["metadata"]
    old = resource.get("status") or {}
    name, generation = meta["name"], meta.get("generation", 0)
    out = {"selector": resources.selector(name), "endpoint": resources.endpoint(name, meta["namespace"])}
    # Where clients get session affinity (router.py); null removes it from
    # the stored status (a merge patch) when routing is turned off.
    routed = router.routing(resource["spec"])["enabled"]
    out["routingEndpoint"] = router.routing_endpoint(name, meta["namespace"]) if routed else None
    if deployment is not None:
        fields, conditions = _from_deployment(deployment, (cache.failure if cache else None) or pod_failure(pods))
        out.update(fields)
    else:
        # Nothing observed: keep what was reported, the error below says why.
        out.update({k: old[k] for k in ("replicas", "readyReplicas", "observedGeneration") if k in old})
        conditions = [c for c in old.get("conditions") or [] if c.get("type") != "Degraded"]
        conditions = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions]
    # RouterReady: only while routing is on; kept as it was when the router
    # was not read this time.
    kept = [c for c in conditions if c["type"] == "RouterReady"]
    conditions = [c for c in conditions if c["type"] != "RouterReady"]
    if routed and router_deployment is not None:
        conditions.append(_router_condition(router_deployment, generation))
    elif routed:
        conditions += kept or [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                               for c in old.get("conditions") or [] if c.get("type") == "RouterReady"]
    # ModelCached: only with a model cache; kept as it was when its Job was not read this time.
    kept = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in old.get("conditions") or [] if c.get("type") == model_cache.CONDITION]
    conditions = [c for c in conditions if c["type"] != model_cache.CONDITION]
    if cache is not None:
        conditions.append(cache.condition)
    elif model_cache.cache_of(resource["spec"]) is not None:
        conditions += kept
    if "autoscaling" not in resource["spec"]:
        out["autoscaling"] = None  # the autoscaler's (scaler.py) while spec.autoscaling is set
    elif deployment is not None and deployment["spec"].get("replicas", 1) == 0:
        conditions = [_ready_at_zero(c, router_deployment) if c["type"] == "Ready" else c for c in conditions]
    if error is not None:
        conditions = [c for c in conditions if c["type"] != "Degraded"]
        conditions.append(_condition("Degraded", True, "ReconcileError", error, generation))
    out["conditions"] = merge_conditions(conditions, old.get("conditions"), now)
    return out


def _ready_at_zero(ready: dict, router_deployment: dict | None) -> dict:
    """Scaled to zero by the autoscaler, a resource still answers: its router
    holds a request and the autoscaler starts a pod (activation.py)."""
    if router_deployment is None or (router_deployment.get("status") or {}).get("readyReplicas", 0) < 1:
        return ready
    return {**ready, "status": "True",
            "message": "no pod runs; the router holds requests while the autoscaler starts one"}


def merge_conditions(new: list[dict], old: list[dict] | None, now: str) -> list[dict]:
    """Give each condition its lastTransitionTime: kept while its status stays
    the same, `now` when the status flips or the condition is new."""
    before = {c.get("type"): c for c in old or []}
    merged = []
    for cond in new:
        prev = before.get(cond["type"])
        stamp = prev.get("lastTransitionTime") if prev and prev.get("status") == cond["status"] else None
        merged.append({**cond, "lastTransitionTime": stamp or now})
    return merged


def changed(resource: dict, new: dict) -> bool:
    """Whether writing `new` would change the stored status (no write, no
    event, no loop when nothing changed)."""
    old = resource.get("status") or {}
    return any(old.get(k) != v for k, v in new.items())
