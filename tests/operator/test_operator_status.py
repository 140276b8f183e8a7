"""Status is a pure function of the owned Deployment."""

from __future__ import annotations

from chatstream_operator import resources, status

from builder_helpers import make_resource


def observed(replicas=2, ready=2, updated=2, available=2, have=None, seen=True, conditions=(), generation=3) -> dict:
    dep = resources.deployment(make_resource({"model": {"source": "builtin:smollm2-135m-instruct"}, "replicas": replicas},
                                             generation=generation))
    dep["metadata"]["generation"] = 5
    dep["status"] = {
        "observedGeneration": 5 if seen else 4,
        "replicas": replicas if have is None else have,
        "readyReplicas": ready, "updatedReplicas": updated, "availableReplicas": available,
        "conditions": list(conditions),
    }
    return dep


def by_type(st: dict) -> dict:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


def test_all_ready():
    st = status.from_deployment(observed())
    assert by_type(st) == {"Ready": ("True", "AllReplicasReady"), "Progressing": ("False", "RolloutComplete"),
                           "Degraded": ("False", "AsExpected")}
    assert st["replicas"] == 2 and st["readyReplicas"] == 2
    assert st["observedGeneration"] == 3
    assert st["selector"] == resources.selector("chat")
    assert st["endpoint"] == "http://chat.team-a.svc:8000"
    assert all(c["observedGeneration"] == 3 for c in st["conditions"])


def test_rolling_out():
    st = status.from_deployment(observed(ready=2, updated=1, have=3))
    assert by_type(st)["Progressing"] == ("True", "RollingOut")
    assert by_type(st)["Ready"] == ("False", "ReplicasNotReady")
    assert st["replicas"] == 3


def test_deployment_controller_not_caught_up_is_still_progressing():
    assert by_type(status.from_deployment(observed(seen=False)))["Progressing"] == ("True", "RollingOut")


def test_scaled_to_zero():
    st = status.from_deployment(observed(replicas=0, ready=0, updated=0, available=0))
    assert by_type(st)["Ready"] == ("False", "ScaledToZero")
    assert by_type(st)["Progressing"] == ("False", "RolloutComplete")


def test_progress_deadline_is_degraded():
    stuck = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "took too long"}
    st = status.from_deployment(observed(ready=0, available=0, conditions=[stuck]))
    assert by_type(st)["Degraded"] == ("True", "ProgressDeadlineExceeded")
    assert next(c for c in st["conditions"] if c["type"] == "Degraded")["message"] == "took too long"


def test_replica_failure_is_degraded():
    quota = {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "exceeded quota"}
    st = status.from_deployment(observed(ready=0, available=0, conditions=[quota]))
    assert by_type(st)["Degraded"] == ("True", "FailedCreate")


def test_transition_time_kept_while_status_holds():
    old = [{"type": "Ready", "status": "True", "lastTransitionTime": "t0"},
           {"type": "Degraded", "status": "True", "lastTransitionTime": "t0"}]
    new = [{"type": "Ready", "status": "True"}, {"type": "Degraded", "status": "False"}, {"type": "Progressing", "status": "False"}]
    merged = {c["type"]: c["lastTransitionTime"] for c in status.merge_conditions(new, old, "t1")}
    assert merged == {"Ready": "t0", "Degraded": "t1", "Progressing": "t1"}


def test_reconcile_error_marks_degraded_and_keeps_others():
    old = [{"type": "Ready", "status": "True", "reason": "AllReplicasReady", "lastTransitionTime": "t0"}]
    patch = status.degraded("quota", 4, old, "t1")
    types = {c["type"]: c for c in patch["conditions"]}
    assert types["Ready"]["lastTransitionTime"] == "t0"
    assert (types["Degraded"]["status"], types["Degraded"]["reason"], types["Degraded"]["message"]) == ("True", "ReconcileError", "quota")
