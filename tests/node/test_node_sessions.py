"""Sessions shared by two replicas through a real Redis running as a pod,
its URL in a Secret: a conversation through the Service keeps its history
whichever pod answers each turn."""

from __future__ import annotations

import time

import httpx
import pytest
from node_helpers import REDIS_SESSIONS, answered, example, model_pods, redis, service_url
from support.kube import apply, condition, get, get_list, kubectl, pod_ready, wait_for

pytestmark = pytest.mark.node

def service_endpoints(name: str, ns: str) -> set[str]:
    """The ready addresses behind a Service (its EndpointSlices)."""
    slices = get_list("endpointslices", ns, f"kubernetes.io/service-name={name}")
    return {a for s in slices for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")
            for a in e["addresses"]}


def test_a_conversation_keeps_its_history_across_two_replicas(operator_pod, redis_image, namespace):
    ns, name = namespace, "shared"
    redis(ns, redis_image)
    apply(example(name, replicas=2, sessions=REDIS_SESSIONS,
                  generation={"maxNewTokens": 48, "contextLength": 2048}), ns)
    wait_for(f"{name} Ready", lambda: condition(get("csd", name, ns), "Ready").get("status") == "True",
             timeout=600, interval=1)
    svc = get("service", name, ns)
    assert svc["spec"]["sessionAffinity"] == "None"  # any pod may answer any turn
    ips = [p["status"]["podIP"] for p in model_pods(name, ns)]
    assert len(ips) == 2
    url = service_url(name, ns)
    wait_for("the Service answering", lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout=60)

    before = {ip: answered(ip) for ip in ips}
    turns = 0
    # A new connection per turn: kube-proxy picks a pod per connection, and
    # a kept-alive one would keep every turn on the same pod.
    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, timeout=120, limits=fresh) as client:
        client.post("/set_generation_params", json={"temperature": 0}).raise_for_status()

        def say(text: str) -> str:
            nonlocal turns
            r = client.post("/chat_stream", json={"user_input": text})
            assert r.status_code == 200, r.text
            turns += 1
            return r.text

        say("My name is Alice. Please remember it.")
        # Small talk until both pods have answered a turn of this conversation.
        for topic in ["Name a color.", "Name a fruit.", "Name an animal.", "Name a city.", "Name a tree.",
                      "Name a planet.", "Name a sport.", "Name a flower."]:
            if turns >= 3 and all(answered(ip) > before[ip] for ip in ips):
                break
            say(topic)
        reply = say("What is my name?")
        served = {ip: answered(ip) - before[ip] for ip in ips}
        prompt = client.get("/get_prompt").json()["prompt"]
    print(f"sessions across replicas: {turns} turns, per pod {served}")
    assert all(n > 0 for n in served.values()), f"one pod answered every turn: {served}"
    assert "Alice" in reply, reply
    assert prompt.count("<|im_start|>user") == turns, prompt



def test_with_the_memory_store_a_conversation_is_lost_with_its_pod(operator_pod, namespace):
    """What docs/sessions.md says a user loses with the memory store and 2
    replicas: the Service keeps a client on one pod (sessionAffinity:
    ClientIP), so the conversation holds while that pod lives; when it goes
    (rollout, scale-down, eviction, crash) the next turn lands on a pod that
    never saw it and starts again there, with a new session and cookie."""
    ns, name = namespace, "memory"
    apply(example(name, replicas=2, sessions={"store": "memory"},
                  generation={"maxNewTokens": 16, "contextLength": 2048}), ns)
    wait_for(f"{name} Ready", lambda: condition(get("csd", name, ns), "Ready").get("status") == "True",
             timeout=600, interval=1)
    assert get("service", name, ns)["spec"]["sessionAffinity"] == "ClientIP"
    pods = {p["status"]["podIP"]: p["metadata"]["name"]
            for p in model_pods(name, ns)}
    assert len(pods) == 2
    url = service_url(name, ns)
    wait_for("the Service answering", lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout=60)

    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, timeout=120, limits=fresh) as client:
        def say(text: str) -> str:
            """The turn, and the pod that answered it."""
            before = {ip: answered(ip) for ip in pods}
            r = client.post("/chat_stream", json={"user_input": text})
            assert r.status_code == 200, r.text
            return next(ip for ip in pods if answered(ip) > before[ip])

        served = {say(t) for t in ["My name is Alice.", "Name a color.", "Name a fruit.", "Name an animal."]}
        assert len(served) == 1, f"the turns of one client spread over {served}"
        [holder] = served
        gone = pods.pop(holder)
        kubectl("delete", "pod", "-n", ns, gone, "--wait=false")
        t0 = time.monotonic()
        # The next turn, once the Service has dropped the leaving pod (its
        # preStop sleep keeps it answering for a few seconds).
        wait_for("the Service without the deleted pod", lambda: holder not in service_endpoints(name, ns), timeout=60)
        # Whichever pod answers it (the other one, or the replacement once
        # Ready) is the one that knows the session then. Pods are told apart by
        # name: the replacement may be given the deleted pod's IP. kube-proxy
        # applies the EndpointSlice change a moment later (longer on a loaded
        # machine), and until then a new connection can still reach the leaving
        # pod: a turn that no live pod holds is not the case under test, and is
        # asked again.
        for attempt in range(1, 31):
            r = client.post("/chat_stream", json={"user_input": "What is my name?"})
            assert r.status_code == 200, r.text
            cookie = {"chatstream_session": client.cookies["chatstream_session"]}
            live = [p["status"]["podIP"] for p in model_pods(name, ns)
                    if pod_ready(p) and p["metadata"]["name"] != gone]
            held = [prompt for prompt in (httpx.get(f"http://{ip}:8000/get_prompt", cookies=cookie,
                                                    timeout=10).json()["prompt"] for ip in live) if prompt]
            if held:
                break
            time.sleep(1)
        else:
            pytest.fail("for 30 turns no live pod answered the conversation's next turn")
    [held] = held
    print(f"memory store, 2 replicas: the pod holding a 4-turn conversation went away; the next turn "
          f"({time.monotonic() - t0:.1f}s later, try {attempt}) was answered by another pod holding "
          f"{held.count('<|im_start|>user') - 1} of the 4 earlier turns")
    assert held.count("<|im_start|>user") == 1 and "Alice" not in held, held
