"""Autoscaling around the decision function: the router's activator wiring
(activation.py, checked by the real haproxy's `haproxy -c`), status, and the
operator's loop (scaler.py) with the API and the router faked.
tests/router/test_router_activator.py runs the activator and this loop
against the real haproxy and a real pod."""

from __future__ import annotations

import asyncio
import copy

from builder_helpers import CRD, ROUTER_IMAGE as IMAGE, haproxy_check, make_resource
from chatstream_operator import activation, autoscale, kube, resources, router, scaler, status
from chatstream_operator.__main__ import parse_args

ACTIVATOR_IMAGE = "localhost/chatstream-operator:test"
SPEC = {"model": {"source": "builtin:smollm2-135m-instruct"}, "concurrency": {"maxConcurrentStreams": 2, "maxQueueSize": 6},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 40, "holdTimeoutSeconds": 60, "maxHeldRequests": 5}}


def autoscaled(**change) -> dict:
    return make_resource({**copy.deepcopy(SPEC), **change})


def children(resource) -> dict:
    return {(m["kind"], m["metadata"]["name"]): m for m in router.children(resource, IMAGE, ACTIVATOR_IMAGE)}


def test_the_config_holds_requests_at_zero_and_is_valid_haproxy(tmp_path):
    config = router.configmap(autoscaled())["data"][router.CONFIG_KEY]
    assert haproxy_check(config, tmp_path).returncode == 0, haproxy_check(config, tmp_path).stderr
    assert "use_backend activator if { nbsrv(pods) lt 1 }" in config
    # Ready with no pod as long as the activator can hold requests.
    assert "monitor fail if { nbsrv(pods) lt 1 } { nbsrv(activator) lt 1 }" in config
    assert f"bind 127.0.0.1:{activation.REPLAY_PORT}" in config
    assert f"server activator 127.0.0.1:{activation.PROXY_PORT} check port {activation.CONTROL_PORT}" in config
    assert "timeout server 660s" in config  # the hold (60 s) and the router's stream timeout
    # Slots cover maxReplicas: the autoscaler never changes the config.
    assert "server-template pod 1-40 " in config


def test_without_autoscaling_the_router_is_what_it_was():
    resource = make_resource()
    config = router.configmap(resource)["data"][router.CONFIG_KEY]
    assert "activator" not in config and "replay" not in config
    got = children(resource)
    assert [c["name"] for c in got["Deployment", "chat-router"]["spec"]["template"]["spec"]["containers"]] == ["haproxy"]
    assert [p["name"] for p in got["Service", "chat-router"]["spec"]["ports"]] == ["http"]


def test_the_activator_runs_beside_haproxy_with_the_specs_bounds():
    got = children(autoscaled())
    pod = got["Deployment", "chat-router"]["spec"]["template"]["spec"]
    haproxy, activator = pod["containers"]
    assert activator["image"] == ACTIVATOR_IMAGE
    assert activator["command"] == ["python", "-m", "chatstream_operator.activator"]
    args = dict(a[2:].split("=", 1) for a in activator["args"])
    assert args["hold-timeout"] == "60" and args["max-held"] == "5"
    assert args["pod-capacity"] == "8"  # 2 streams + 6 queued per pod
    # It stops as HAProxy does: after the same preStop, streams given the pods' grace, within the pod's.
    assert activator["lifecycle"] == haproxy["lifecycle"]
    grace = got["Deployment", "chat-router"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert int(args["grace"]) == autoscaled()["spec"]["shutdownGraceSeconds"]
    assert activator["lifecycle"]["preStop"]["sleep"]["seconds"] + int(args["grace"]) < grace
    assert args["listen"] == f"127.0.0.1:{activation.PROXY_PORT}"  # only HAProxy reaches the proxy
    # The stats socket is in the shared emptyDir, and the activator runs as HAProxy's user (the pod's).
    assert {m["mountPath"] for m in activator["volumeMounts"]} == {"/run/haproxy"}
    assert "runAsUser" not in activator["securityContext"] and pod["securityContext"]["runAsUser"] == router.UID
    assert activator["securityContext"]["readOnlyRootFilesystem"] and not pod["automountServiceAccountToken"]
    ports = {p["name"]: p["port"] for p in got["Service", "chat-router"]["spec"]["ports"]}
    assert ports == {"http": router.ROUTER_PORT, "activator": activation.CONTROL_PORT}
    assert scaler.signal_url(autoscaled()) == f"http://chat-router.team-a.svc.cluster.local:{activation.CONTROL_PORT}/signal"


def test_autoscaling_settings_never_roll_the_model_pods():
    assert resources.spec_hash(make_resource()["spec"]) == resources.spec_hash(
        make_resource({"model": {"source": "builtin:smollm2-135m-instruct"}, "autoscaling": {"maxReplicas": 9}})["spec"])


def test_the_activator_image_setting(monkeypatch):
    assert parse_args([]).activator_image == resources.Images.activator
    monkeypatch.setenv("CHATSTREAM_OPERATOR_ACTIVATOR_IMAGE", "registry.example/op:1")
    assert parse_args([]).activator_image == "registry.example/op:1"


def _deployment(resource, replicas):
    dep = resources.deployment(resource)
    dep["spec"]["replicas"] = replicas
    dep["metadata"]["generation"] = 1
    dep["status"] = {"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas,
                     "updatedReplicas": replicas, "availableReplicas": replicas}
    return dep


def test_status_at_zero_is_ready_while_the_router_can_hold_requests():
    resource = autoscaled(replicas=0)
    ready_router = {"spec": {"replicas": 1}, "status": {"readyReplicas": 1}}
    st = status.compute(resource, _deployment(resource, 0), [], None, "2026-12-05T00:00:00Z", ready_router)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ScaledToZero")
    assert "autoscaling" not in st  # the scaler's own field: the reconcile leaves it alone
    st = status.compute(resource, _deployment(resource, 0), [], None, "2026-12-05T00:00:00Z",
                        {"spec": {"replicas": 1}, "status": {}})
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["status"] == "False"
    # Without autoscaling, zero is not ready, and a leftover status.autoscaling is removed.
    plain = make_resource({"model": {"source": "builtin:smollm2-135m-instruct"}, "replicas": 0})
    plain["status"] = {"autoscaling": {"desiredReplicas": 2}}
    st = status.compute(plain, _deployment(plain, 0), [], None, "2026-12-05T00:00:00Z", ready_router)
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["status"] == "False"
    assert st["autoscaling"] is None and status.changed(plain, st)


def test_kubectl_get_shows_the_last_decision():
    version = CRD["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Scaling"] == ".status.autoscaling.reason" and columns["Replicas"] == ".spec.replicas"
    fields = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["autoscaling"]["properties"]
    d = autoscale.Decision(2, "ScaledUp", "1 -> 2: ...", True, 7.5)
    written = scaler.status_of(d, {"status": {"replicas": 1}}, 0, "2026-12-05T00:00:00Z")
    assert set(written) <= set(fields)
    assert written["desiredReplicas"] == 2 and written["currentReplicas"] == 1 and written["reason"] == "ScaledUp"


class FakeRouter:
    """The activator's /signal, scripted: each read takes the next answer (an
    exception is raised); the last one repeats."""

    def __init__(self, *answers):
        self.answers, self.reads = list(answers), []

    async def __call__(self, body, since, wait):
        self.reads.append(since)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_held_request_scales_from_zero_once_however_late_the_watch_is():
    body = autoscaled(replicas=0)
    held = {"load": 1, "held": 1, "held_total": 1, "in_flight": 0, "queued": 0, "pods_up": 0}
    writes = []

    async def act(b, decision, st):
        writes.append((decision.replicas, decision.reason, st["heldRequests"]))

    async def main():
        clock = Clock()
        s = scaler.Scaler(body, FakeRouter(held), act, interval=0.01, clock=clock)
        for _ in range(20):  # the watch still shows replicas 0: the write stands
            await s.step()
            clock.now += 0.5
        return s

    s = asyncio.run(main())
    assert writes == [(1, "ScaledFromZero", 1)]
    assert s.since == 1  # the next long poll waits for a request held after this one


def test_a_decision_refused_because_autoscaling_changed_is_not_taken_as_made():
    """The write tests spec.autoscaling (kube.replicas_patch): refused, the
    scaler does not count the new replicas as pending, and decides again."""
    body = autoscaled(replicas=0)
    held = {"load": 1, "held": 1, "held_total": 1, "in_flight": 0, "queued": 0, "pods_up": 0}
    answers = [False, True]
    writes = []

    async def act(b, decision, st):
        writes.append(decision.replicas)
        return answers.pop(0)

    async def main():
        s = scaler.Scaler(body, FakeRouter(held), act, interval=0.01, clock=Clock())
        first = await s.step()
        assert s.current() == 0 and not s.decisions  # nothing was written
        await s.step()
        return first, s

    first, s = asyncio.run(main())
    assert first.reason == "ScaledFromZero" and writes == [1, 1] and s.current() == 1 and len(s.decisions) == 1
    patch = kube.replicas_patch(1, body["spec"]["autoscaling"])
    assert patch[0] == {"op": "test", "path": "/spec/autoscaling", "value": body["spec"]["autoscaling"]}
    assert patch[1] == {"op": "add", "path": "/spec/replicas", "value": 1}


def test_an_unreachable_router_scales_nothing_down_and_clamps_still_apply(caplog):
    body = autoscaled(replicas=3, autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleDownDelaySeconds": 0})
    writes = []

    async def act(b, decision, st):
        writes.append((decision.replicas, decision.reason))
        b["spec"]["replicas"] = decision.replicas  # as the watch would show it

    async def main():
        s = scaler.Scaler(body, FakeRouter(OSError("connection refused")), act, interval=0.001, clock=Clock())
        return [await s.step() for _ in range(5)]

    decisions = asyncio.run(main())
    assert writes == [(2, "AboveMaximum")]
    assert [d.reason for d in decisions[1:]] == ["NoSignal"] * 4
    assert sum("no load signal" in r.message for r in caplog.records) == 1  # said once, not every second


def test_scalers_follow_spec_autoscaling():
    started = []

    class Idle(scaler.Scaler):
        async def run(self):
            started.append(self.body["metadata"]["name"])
            await asyncio.sleep(3600)

    async def main():
        scalers = scaler.Scalers(lambda body: Idle(body, None, None))
        key = ("team-a", "chat")
        scalers.update(key, autoscaled())
        scalers.update(key, autoscaled(replicas=2))  # the same scaler gets the new body
        await asyncio.sleep(0)
        assert scalers.scalers[key].body["spec"]["replicas"] == 2 and len(scalers.tasks) == 1
        task = scalers.tasks[key]
        scalers.update(key, make_resource())  # autoscaling removed: stopped
        await asyncio.sleep(0)
        assert task.cancelled() and not scalers.tasks
        scalers.update(key, autoscaled())
        await asyncio.sleep(0)
        await scalers.close()
        assert not scalers.tasks

    asyncio.run(main())
    assert started == ["chat", "chat"]
