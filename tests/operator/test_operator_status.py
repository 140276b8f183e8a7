"""Status is a pure function of the resource, its Deployment, its pods and
the last reconcile error (status.compute)."""

from __future__ import annotations

import pytest

from chatstream_operator import resources, status

from builder_helpers import make_resource

NOW = "2026-01-01T00:00:00Z"


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


def pod(name="chat-abc", *, ready=True, state=None, last=None, restarts=0, init=None, deleting=False, phase="Running") -> dict:
    """A pod as the kubelet reports it."""
    cs = {"name": "chatstream", "ready": ready, "restartCount": restarts, "state": state or {"running": {}},
          "lastState": last or {}}
    p = {"kind": "Pod", "metadata": {"name": name, "namespace": "team-a", "labels": resources.labels("chat")},
         "status": {"phase": phase, "containerStatuses": [cs]}}
    if init is not None:
        p["status"]["initContainerStatuses"] = [init]
    if deleting:
        p["metadata"]["deletionTimestamp"] = NOW
    return p


LOADER = "cannot load hf:nobody/nothing: no network to reach the Hugging Face hub"
CRASHED = {"terminated": {"exitCode": 1, "reason": "Error", "message": LOADER}}


def compute(deployment=None, pods=(), error=None, old_status=None, generation=3) -> dict:
    body = make_resource(generation=generation)
    if old_status is not None:
        body["status"] = old_status
    return status.compute(body, deployment, list(pods), error, NOW)


def by_type(st: dict) -> dict:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


def cond(st: dict, type_: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_all_ready():
    st = compute(observed(), [pod("a"), pod("b")])
    assert by_type(st) == {"Ready": ("True", "AllReplicasReady"), "Progressing": ("False", "RolloutComplete"),
                           "Degraded": ("False", "AsExpected")}
    assert st["replicas"] == 2 and st["readyReplicas"] == 2
    assert st["observedGeneration"] == 3
    assert st["selector"] == resources.selector("chat")
    assert st["endpoint"] == "http://chat.team-a.svc:8000"
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == NOW for c in st["conditions"])


def test_rolling_out():
    st = compute(observed(ready=2, updated=1, have=3))
    assert by_type(st)["Progressing"] == ("True", "RollingOut")
    assert by_type(st)["Ready"] == ("False", "ReplicasNotReady")
    assert st["replicas"] == 3


def test_deployment_controller_not_caught_up_is_still_progressing():
    assert by_type(compute(observed(seen=False)))["Progressing"] == ("True", "RollingOut")


def test_scaled_to_zero():
    st = compute(observed(replicas=0, ready=0, updated=0, available=0))
    assert by_type(st)["Ready"] == ("False", "ScaledToZero")
    assert by_type(st)["Progressing"] == ("False", "RolloutComplete")


@pytest.mark.parametrize("failing", [
    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "took too long"},
    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": "exceeded quota"},
], ids=["progress-deadline", "replica-failure"])
def test_a_failing_deployment_condition_is_degraded_with_its_reason_and_message(failing):
    st = compute(observed(ready=0, available=0, conditions=[failing]))
    assert by_type(st)["Degraded"] == ("True", failing["reason"])
    assert cond(st, "Degraded")["message"] == failing["message"]


# --- a model that cannot load: the pods say why ----------------------------

def test_crash_loop_reports_the_loaders_message():
    """The service writes the loader's error to /dev/termination-log and
    exits; the kubelet restarts it with back-off. Status says Degraded with
    that message, and not Ready."""
    crashing = pod("chat-x", ready=False, restarts=3, state={"waiting": {"reason": "CrashLoopBackOff",
                   "message": "back-off 40s restarting failed container"}}, last=CRASHED)
    st = compute(observed(replicas=1, ready=0, available=0), [crashing])
    degraded = cond(st, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "CrashLoopBackOff")
    assert LOADER in degraded["message"]
    assert degraded["message"].startswith("pod chat-x: ") and "exit code 1" in degraded["message"]
    assert by_type(st)["Ready"] == ("False", "ReplicasNotReady")


def test_a_container_killed_by_its_memory_limit_says_so_between_restarts():
    # On the real node the status said CrashLoopBackOff, exit code 137, between restarts: the reason
    # (OOMKilled) was in lastState only.
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    looping = pod("chat-x", ready=False, restarts=2, state={"waiting": {"reason": "CrashLoopBackOff"}}, last=oom)
    degraded = cond(compute(observed(replicas=1, ready=0, available=0), [looping]), "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "OOMKilled")
    assert "exit code 137" in degraded["message"] and "CrashLoopBackOff" in degraded["message"]


def test_first_exit_already_counts_before_the_back_off():
    st = compute(observed(replicas=1, ready=0, available=0), [pod(ready=False, state=CRASHED)])
    assert by_type(st)["Degraded"] == ("True", "Error") and LOADER in cond(st, "Degraded")["message"]


def test_restarted_after_a_failure_stays_degraded_between_crashes():
    """Loading again after a crash (running, not ready): no flapping back to
    AsExpected between two crashes."""
    again = pod(ready=False, restarts=1, state={"running": {}}, last=CRASHED)
    st = compute(observed(replicas=1, ready=0, available=0), [again])
    assert cond(st, "Degraded")["status"] == "True" and LOADER in cond(st, "Degraded")["message"]


def test_a_pod_that_recovered_is_not_degraded():
    """Ready again after an earlier crash (e.g. a node hiccup): healthy."""
    fine = pod(ready=True, restarts=1, last=CRASHED)
    st = compute(observed(replicas=1, ready=1, updated=1, available=1), [fine])
    assert by_type(st)["Degraded"] == ("False", "AsExpected") and by_type(st)["Ready"][0] == "True"


def test_starting_pods_and_clean_exits_are_not_failures():
    starting = pod(ready=False, state={"waiting": {"reason": "ContainerCreating"}})
    clean = pod("chat-y", ready=False, restarts=1, last={"terminated": {"exitCode": 0, "reason": "Completed"}})
    st = compute(observed(replicas=2, ready=0, available=0), [starting, clean])
    assert by_type(st)["Degraded"] == ("False", "AsExpected")


def test_without_a_termination_message_the_kubelets_message_is_used():
    pulling = pod(ready=False, state={"waiting": {"reason": "ImagePullBackOff", "message": "image not found"}})
    st = compute(observed(replicas=1, ready=0, available=0), [pulling])
    assert by_type(st)["Degraded"] == ("True", "ImagePullBackOff")
    assert "image not found" in cond(st, "Degraded")["message"]


def test_a_failing_init_container_is_reported():
    init = {"name": "seed-cache", "ready": False, "restartCount": 2,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "cp: No space left on device"}}}
    st = compute(observed(replicas=1, ready=0, available=0),
                 [pod(ready=False, state={"waiting": {"reason": "PodInitializing"}}, init=init)])
    assert "container seed-cache" in cond(st, "Degraded")["message"]
    assert "No space left" in cond(st, "Degraded")["message"]


def test_pods_being_deleted_are_ignored_and_the_answer_does_not_depend_on_order():
    gone = pod("chat-a", ready=False, state=CRASHED, deleting=True)
    first = pod("chat-b", ready=False, state={"terminated": {"exitCode": 2, "message": "first"}})
    second = pod("chat-c", ready=False, state={"terminated": {"exitCode": 3, "message": "second"}})
    dep = observed(replicas=2, ready=0, available=0)
    a, b = compute(dep, [gone, second, first]), compute(dep, [first, gone, second])
    assert a == b and cond(a, "Degraded")["message"].startswith("pod chat-b: first")


def test_a_huge_termination_message_keeps_its_end():
    log = "x" * 5000 + " the real error"
    st = compute(observed(replicas=1, ready=0, available=0),
                 [pod(ready=False, state={"terminated": {"exitCode": 1, "message": log}})])
    msg = cond(st, "Degraded")["message"]
    assert "the real error" in msg and len(msg) < status.MAX_MESSAGE + 200


# --- the reconcile's own failure, and transition times -----------------------

def test_reconcile_error_marks_degraded_and_keeps_what_was_observed():
    old = {"replicas": 2, "readyReplicas": 2, "observedGeneration": 3,
           "conditions": [{"type": "Ready", "status": "True", "reason": "AllReplicasReady", "lastTransitionTime": "t0"},
                          {"type": "Degraded", "status": "False", "reason": "AsExpected", "lastTransitionTime": "t0"}]}
    st = compute(None, [], error="quota", old_status=old, generation=4)
    types = {c["type"]: c for c in st["conditions"]}
    assert types["Ready"]["lastTransitionTime"] == "t0" and types["Ready"]["status"] == "True"
    assert (types["Degraded"]["status"], types["Degraded"]["reason"], types["Degraded"]["message"]) == ("True", "ReconcileError", "quota")
    assert types["Degraded"]["lastTransitionTime"] == NOW
    assert st["readyReplicas"] == 2 and st["observedGeneration"] == 3  # not yet built from generation 4


def test_reconcile_error_wins_over_what_the_deployment_says():
    st = compute(observed(), [pod()], error="the API refused a child")
    assert by_type(st)["Degraded"] == ("True", "ReconcileError")


def test_transition_time_kept_while_status_holds():
    old = [{"type": "Ready", "status": "True", "lastTransitionTime": "t0"},
           {"type": "Degraded", "status": "True", "lastTransitionTime": "t0"}]
    new = [{"type": "Ready", "status": "True"}, {"type": "Degraded", "status": "False"}, {"type": "Progressing", "status": "False"}]
    merged = {c["type"]: c["lastTransitionTime"] for c in status.merge_conditions(new, old, "t1")}
    assert merged == {"Ready": "t0", "Degraded": "t1", "Progressing": "t1"}


def test_recomputing_what_is_stored_is_no_change():
    """The operator writes status only when it changed: a status event it
    caused itself must not lead to another write (no loop)."""
    first = compute(observed(), [pod()])
    body = make_resource(generation=3)
    body["status"] = first
    again = status.compute(body, observed(), [pod()], None, "2026-01-01T00:05:00Z")
    assert again == first and not status.changed(body, again)
    body["status"] = {**first, "readyReplicas": 1}
    assert status.changed(body, again)
