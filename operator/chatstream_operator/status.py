"""The status of a ChatStreamDeployment, read off its Deployment.

Pure: what the operator reports is a function of what it observes, so a
restarted operator reports the same thing and a test can pin every case.
"""

from __future__ import annotations

from . import resources


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


def from_deployment(deployment: dict) -> dict:
    """Status fields for the owner of `deployment` (conditions without
    lastTransitionTime: `merge_conditions` keeps or stamps those)."""
    meta, spec = deployment["metadata"], deployment["spec"]
    owner = meta["labels"]["app.kubernetes.io/instance"]
    st = deployment.get("status") or {}
    generation = int((meta.get("annotations") or {}).get(resources.GENERATION_ANNOTATION, 0))
    want = spec.get("replicas", 1)
    have, ready = st.get("replicas", 0), st.get("readyReplicas", 0)
    updated, available = st.get("updatedReplicas", 0), st.get("availableReplicas", 0)
    seen = st.get("observedGeneration", 0) >= meta.get("generation", 0)

    rolled_out = seen and updated == want and have == want and available == want
    ready_ok = want > 0 and ready >= want and rolled_out
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
    failure = _deployment_condition(deployment, "ReplicaFailure")
    if stuck.get("status") == "False" and stuck.get("reason") == "ProgressDeadlineExceeded":
        degraded_c = _condition("Degraded", True, "ProgressDeadlineExceeded", stuck.get("message", ""), generation)
    elif failure.get("status") == "True":
        degraded_c = _condition("Degraded", True, failure.get("reason") or "ReplicaFailure", failure.get("message", ""), generation)
    else:
        degraded_c = _condition("Degraded", False, "AsExpected", "no failures seen", generation)

    return {
        "replicas": have,
        "readyReplicas": ready,
        "selector": resources.selector(owner),
        "observedGeneration": generation,
        "endpoint": resources.endpoint(owner, meta["namespace"]),
        "conditions": [ready_c, progressing_c, degraded_c],
    }


def merge_conditions(new: list[dict], old: list[dict], now: str) -> list[dict]:
    """Give each condition its lastTransitionTime: kept while its status stays
    the same, `now` when the status flips or the condition is new."""
    before = {c.get("type"): c for c in old or []}
    merged = []
    for cond in new:
        prev = before.get(cond["type"])
        stamp = prev.get("lastTransitionTime") if prev and prev.get("status") == cond["status"] else None
        merged.append({**cond, "lastTransitionTime": stamp or now})
    return merged


def degraded(message: str, generation: int, old_conditions: list[dict], now: str) -> dict:
    """Status patch for a reconcile that failed (e.g. the API refused a child)."""
    keep = [c for c in old_conditions or [] if c.get("type") != "Degraded"]
    cond = _condition("Degraded", True, "ReconcileError", message, generation)
    return {"conditions": merge_conditions(keep + [cond], old_conditions, now)}
