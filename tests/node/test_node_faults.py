"""Faults of the rest of the system on the real node (markers `node` and
`faults`): the router pod force-deleted mid-stream, Redis stopped for 20 s,
the operator deleted during a rollout and during a scale, a model pod killed
by its memory limit, and clients that open many connections and read nothing.
Each prints what the client saw and how long recovery took
(docs/failure-semantics.md, "When a part of the cluster fails").

One resource (2 replicas, Redis sessions, the router) serves every test but
the memory one, in file order: the operator test rolls it and scales it to 3,
which the slowloris test after it does not mind. Sharing it saves a minute of
pods starting per test (`make test` has a 45-minute budget).
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from node_helpers import answered, csd_ready, deploy_with_redis, example, model_pods, record, report, service_url
from streams import Load, host_pids, stream_and_force_delete, stream_once
from support.client import ChatEvents
from support.kube import RELEASE_NS, apply, condition, get, get_list, kubectl, pod_ready, wait_for

from chatstream_operator import resources, router

pytestmark = [pytest.mark.node, pytest.mark.faults]

NAME = "faults"
MODEL = "smollm2-135m-instruct"
STORY = "Tell me a long story about a lighthouse keeper and a storm."
FRESH = httpx.Limits(max_keepalive_connections=0)  # a new connection per request, as separate clients make
REDIS_OUTAGE_SECONDS = 20
SLOW_CONNECTIONS = 1000
GRACE = 300  # as tests/node/test_node_rollout.py: a drain on 2 oversubscribed cores can take minutes


def ready_ips(name: str, ns: str) -> list[str]:
    return [p["status"]["podIP"] for p in model_pods(name, ns) if pod_ready(p) and not p["metadata"].get("deletionTimestamp")]


def router_pod(name: str, ns: str) -> dict | None:
    pods = [p for p in get_list("pods", ns, ",".join(f"{k}={v}" for k, v in router.router_labels(name).items()))
            if not p["metadata"].get("deletionTimestamp")]
    return pods[0] if len(pods) == 1 else None


def served_by(ips: list[str], turn) -> str:
    """The model pod that answered `turn()` (run alone): the one whose own /metrics counted a stream."""
    before = {ip: answered(ip) for ip in ips}
    turn()
    moved = [ip for ip in ips if answered(ip) > before[ip]]
    assert len(moved) == 1, f"one pod should have answered: {moved}"
    return moved[0]


def chat_turn(client: httpx.Client, text: str) -> httpx.Response:
    r = client.post("/chat_stream", json={"user_input": text})
    assert r.status_code == 200, r.text
    return r


def user_turns(client: httpx.Client) -> list[str]:
    """The user turns of the session's history, in order (ChatML, as the builtin model renders it)."""
    prompt = client.get("/get_prompt").json()["prompt"] or ""
    return [part.split("<|im_end|>", 1)[0].strip() for part in prompt.split("<|im_start|>user\n")[1:]]


@pytest.fixture(scope="module")
def faulty(operator_pod, redis_image, module_namespace):
    ns = module_namespace
    deploy_with_redis(NAME, ns, redis_image, generation={"maxNewTokens": 64, "contextLength": 2048},
                      shutdownGraceSeconds=GRACE)
    url = service_url(router.router_name(NAME), ns)
    wait_for("the router answering", lambda: stream_once(url, 4, 30)[0] == "completed", timeout=120)
    return ns, url


# -- 1. the router pod force-deleted mid-stream -------------------------------------------------------------

def test_router_force_deleted_mid_stream(faulty):
    ns, url = faulty
    ips = ready_ips(NAME, ns)
    assert len(ips) == 2
    clients = [httpx.Client(base_url=url, timeout=120, limits=FRESH) for _ in range(3)]
    try:
        for c in clients:
            c.post("/set_generation_params", json={"temperature": 0}).raise_for_status()
        before = [served_by(ips, lambda c=c, i=i: chat_turn(c, f"My name is User{i}. Say hello."))
                  for i, c in enumerate(clients)]

        victim = router_pod(NAME, ns)
        body = {"model": MODEL, "stream": True, "max_tokens": 256, "messages": [{"role": "user", "content": STORY}]}
        stream, error, t_deleted = stream_and_force_delete(url, body, victim, ns)
        assert t_deleted is not None, "the stream ended before the router could be deleted"
        ended = time.monotonic() - t_deleted
        seen = f"{stream.events} pieces, then {type(error).__name__ if error else 'EOF without [DONE]'}"
        assert not stream.done, "a clean [DONE] although the router carrying the stream was killed"
        assert ended < 30, f"the client waited {ended:.0f}s: a hang, not a clear end"

        new = wait_for("a new router pod Ready", lambda: (p := router_pod(NAME, ns)) and
                       p["metadata"]["uid"] != victim["metadata"]["uid"] and pod_ready(p) and p, timeout=180)
        pod_back = time.monotonic() - t_deleted
        wait_for("the router answering again", lambda: stream_once(url, 4, 30)[0] == "completed",
                 timeout=120, interval=0.5)
        answering = time.monotonic() - t_deleted
        after = [[served_by(ips, lambda c=c, t=t: chat_turn(c, t)) for t in ("Name a color.", "Name a fruit.")]
                 for c in clients]
        histories = [user_turns(c) for c in clients]
    finally:
        for c in clients:
            c.close()
    kept = sum(a[0] == b for a, b in zip(after, before))
    report(f"router force-deleted mid-stream: the client saw {seen} {ended:.1f}s after the delete; new router pod "
           f"Ready after {pod_back:.1f}s, answering after {answering:.1f}s; afterwards {kept} of 3 conversations "
           f"on the pod they had before, each on one pod from then on")
    record("router force-deleted -> router answering again", answering)
    assert new["spec"]["nodeName"] and answering - pod_back < 15, \
        f"answering {answering - pod_back:.1f}s after the new router pod was Ready"
    for i, (turns, pods) in enumerate(zip(histories, after)):
        assert len(set(pods)) == 1, f"conversation {i} moved between pods after the restart: {pods}"
        assert turns == [f"My name is User{i}. Say hello.", "Name a color.", "Name a fruit."], turns


# -- 2. Redis stopped for 20 s ------------------------------------------------------------------------------

def error_code(r: httpx.Response) -> str | None:
    """The `code` of an error in the one shape; None for a success or a body of another shape."""
    if r.status_code == 200:
        return None
    try:
        return (r.json().get("error") or {}).get("code")
    except (json.JSONDecodeError, AttributeError):
        return None


def test_redis_stopped_for_20_seconds(faulty):
    """SIGSTOP, not a deleted pod: a stopped Redis keeps its data (the test image keeps none on disk), and
    its clients see what a hung or partitioned Redis gives them: connections that get no answer."""
    ns, url = faulty
    [redis_pod] = [p for p in get_list("pods", ns, "app=redis") if pod_ready(p)]
    pids = host_pids(redis_pod, "redis-server")
    assert len(pids) == 1, f"redis-server of pod {redis_pod['metadata']['name']} on this host: {pids}"
    names = "ABCD"
    clients = {n: httpx.Client(base_url=url, timeout=120, limits=FRESH) for n in names}
    acknowledged = {n: [] for n in names}   # user turns the client saw answered whole
    during, running, v1_during = [], {}, []
    try:
        for n, c in clients.items():
            c.post("/set_generation_params", json={"temperature": 0}).raise_for_status()
            text = f"Hello, I am {n}."
            chat_turn(c, text)
            acknowledged[n].append(text)

        def long_turn(n: str) -> None:
            t0, text, got = time.monotonic(), "Tell me a story about a storm.", b""
            try:
                with clients[n].stream("POST", "/chat_stream", json={"user_input": text}) as r:
                    running[n] = {"status": r.status_code}
                    for chunk in r.iter_bytes():
                        got += chunk
                        running[n]["first"] = running[n].get("first", time.monotonic())
                running[n].update(complete=r.status_code == 200, seconds=time.monotonic() - t0, text=text)
            except httpx.HTTPError as err:
                running[n].update(complete=False, error=repr(err), seconds=time.monotonic() - t0)

        threads = [threading.Thread(target=long_turn, args=(n,)) for n in "AB"]
        for t in threads:
            t.start()
        wait_for("both running streams under way", lambda: all("first" in running.get(n, {}) for n in "AB"),
                 timeout=120, interval=0.05)
        os.kill(pids[0], signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            i = 0
            while time.monotonic() - t_stop < REDIS_OUTAGE_SECONDS - 3:
                i += 1
                for who, c in (("C", clients["C"]), ("D", clients["D"]),
                               ("new", httpx.Client(base_url=url, timeout=60, limits=FRESH))):
                    t0 = time.monotonic()
                    try:
                        r = c.post("/chat_stream", json={"user_input": f"Turn {i} during the outage."})
                        during.append({"who": who, "status": r.status_code, "seconds": time.monotonic() - t0,
                                       "retry_after": r.headers.get("retry-after"), "code": error_code(r)})
                        if r.status_code == 200 and who != "new":
                            acknowledged[who].append(f"Turn {i} during the outage.")
                    except httpx.HTTPError as err:
                        during.append({"who": who, "status": None, "error": repr(err), "seconds": time.monotonic() - t0})
                    finally:
                        if who == "new":
                            c.close()
                v1_during.append(stream_once(url, 4, 30)[0])
                time.sleep(0.5)
        finally:
            time.sleep(max(0.0, REDIS_OUTAGE_SECONDS - (time.monotonic() - t_stop)))
            os.kill(pids[0], signal.SIGCONT)
        t_cont = time.monotonic()
        for t in threads:
            t.join(180)
        for n in "AB":
            if running[n].get("complete"):
                acknowledged[n].append(running[n]["text"])

        def back():
            r = clients["C"].post("/chat_stream", json={"user_input": "And now, after the outage?"})
            return r.status_code == 200
        wait_for("a turn answered once Redis is back", back, timeout=60, interval=0.5)
        recovered = time.monotonic() - t_cont
        acknowledged["C"].append("And now, after the outage?")
        histories = {n: user_turns(c) for n, c in clients.items()}
    finally:
        for c in clients.values():
            c.close()

    statuses = sorted({str(d["status"]) for d in during})
    slowest = max(d["seconds"] for d in during)
    report(f"Redis stopped {REDIS_OUTAGE_SECONDS}s: running streams {[(n, running[n].get('complete'), round(running[n].get('seconds', 0), 1)) for n in 'AB']}; "
           f"{len(during)} /chat_stream turns during it got {statuses} (slowest answer {slowest:.1f}s, "
           f"Retry-After {sorted({d.get('retry_after') for d in during if d['status'] == 503})}); /v1 during it: "
           f"{v1_during.count('completed')}/{len(v1_during)} completed; a turn answered {recovered:.1f}s after Redis "
           f"was back; histories {[len(h) for h in histories.values()]} turns")
    record("Redis back -> next /chat_stream turn answered", recovered)
    for n in "AB":
        assert running[n].get("complete"), f"the stream running when Redis stopped did not finish: {running[n]}"
    assert during, "no request was made during the outage"
    for d in during:
        assert d["status"] in (200, 503), f"a turn during the outage got {d}: never a 500, never a hang"
        if d["status"] == 503:
            assert d["retry_after"] and d["code"], d
        assert d["seconds"] < 10, f"a turn waited {d['seconds']:.1f}s for an answer: {d}"
    assert any(d["status"] == 503 for d in during), "Redis was stopped, yet every turn was answered"
    assert recovered < 15, f"the first turn after the outage was answered {recovered:.1f}s after Redis came back"
    for n in names:
        # Never a lost turn, never a refused one recorded, each turn once and in order: the history is exactly
        # what the client saw answered.
        assert histories[n] == acknowledged[n], (n, histories[n], acknowledged[n], unsaved_lines(ns))


def unsaved_lines(ns: str) -> list[str]:
    """What the model pods logged about sessions they could not save (why a turn was lost)."""
    lines = []
    for pod in model_pods(NAME, ns):
        logs = kubectl("logs", "-n", ns, pod["metadata"]["name"], "--tail=400", check=False).stdout
        lines += [f"{pod['metadata']['name']}: {line}" for line in logs.splitlines() if "not saved" in line]
    return lines[-10:]


# -- 3. the operator deleted during a rollout and during a scale ---------------------------------------------

def operator_pod_now() -> dict | None:
    pods = [p for p in get_list("pods", RELEASE_NS, "app.kubernetes.io/name=chatstream-operator")
            if not p["metadata"].get("deletionTimestamp")]
    return pods[0] if len(pods) == 1 and pod_ready(pods[0]) else None


def delete_operator() -> tuple[str, float]:
    pod = operator_pod_now()
    assert pod, "no single ready operator pod"
    kubectl("delete", "pod", "-n", RELEASE_NS, pod["metadata"]["name"], "--wait=false")
    return pod["metadata"]["uid"], time.monotonic()


def operator_back(old_uid: str) -> float:
    wait_for("a new operator pod Ready", lambda: (p := operator_pod_now()) and p["metadata"]["uid"] != old_uid,
             timeout=180, interval=0.5)
    return time.monotonic()


def children_as_built(name: str, ns: str) -> None:
    """Every child the builders make exists once, owned by the resource; nothing else carries its label;
    one ReplicaSet serves the pods, and the pods run the current spec."""
    csd = get("csd", name, ns)
    want = [resources.deployment(csd), resources.service(csd), *router.children(csd, "image")]
    want_keys = {(m["kind"], m["metadata"]["name"]) for m in want}
    want_keys |= {("Secret", resources.session_secret_name(name)), ("Secret", resources.session_secret_copy_name(name))}
    managed = f"app.kubernetes.io/managed-by={resources.MANAGER}"
    have = []
    for kind in ("deployments", "services", "configmaps", "secrets"):
        for obj in get_list(kind, ns, managed):
            if resources.owner_of({**obj, "kind": obj.get("kind", kind)}) == name:
                have.append(obj)
    have_keys = [(o["kind"], o["metadata"]["name"]) for o in have]
    assert sorted(have_keys) == sorted(want_keys), f"children: {sorted(have_keys)} (want {sorted(want_keys)})"
    for obj in have:
        refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]
        assert [r["uid"] for r in refs] == [csd["metadata"]["uid"]], (obj["kind"], obj["metadata"]["name"], refs)
    live_sets = [rs for rs in get_list("replicasets", ns, resources.selector(name)) if rs["spec"].get("replicas")]
    assert len(live_sets) == 1, f"{len(live_sets)} ReplicaSets with replicas for {name}"
    want_hash = resources.spec_hash(csd["spec"])
    pods = [p for p in model_pods(name, ns) if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == csd["spec"]["replicas"], f"{len(pods)} pods for {csd['spec']['replicas']} replicas"
    assert {p["metadata"]["annotations"][resources.SPEC_HASH_ANNOTATION] for p in pods} == {want_hash}


def test_operator_deleted_during_a_rollout_and_a_scale(faulty):
    (ns, url), name = faulty, NAME
    wait_for(f"{name} Ready", lambda: csd_ready(name, ns) and len(ready_ips(name, ns)) == 2, timeout=300, interval=1)
    with Load(url, clients=4, max_tokens=32) as load:
        wait_for("streams flowing", lambda: load.tally.completed >= 4, timeout=180)
        # (a) a rollout: the operator goes once the Deployment is rolling.
        t0 = time.monotonic()
        kubectl("patch", "csd", name, "-n", ns, "--type=merge", "-p", '{"spec": {"generation": {"maxNewTokens": 60}}}')
        generation = get("csd", name, ns)["metadata"]["generation"]
        wait_for("the rollout under way", lambda: condition(get("csd", name, ns), "Progressing").get("status") == "True"
                 or (get("deployment", name, ns)["status"].get("updatedReplicas", 0) < 2), timeout=120, interval=0.2)
        old, t_del = delete_operator()
        back = operator_back(old) - t_del
        wait_for("the rollout converged", lambda: csd_ready(name, ns, generation), timeout=GRACE + 600, interval=1)
        rollout = time.monotonic() - t0
        children_as_built(name, ns)
        # (b) a scale: the operator goes at once, before it could act on it.
        t0 = time.monotonic()
        kubectl("scale", "csd", name, "-n", ns, "--replicas=3")
        old, t_del = delete_operator()
        generation = get("csd", name, ns)["metadata"]["generation"]
        back_scale = operator_back(old) - t_del
        wait_for("the scale converged", lambda: csd_ready(name, ns, generation)
                 and get("csd", name, ns)["status"].get("readyReplicas") == 3, timeout=600, interval=1)
        scale = time.monotonic() - t0
        children_as_built(name, ns)
        wait_for("more streams after the scale", lambda: load.tally.completed >= 12, timeout=180)
    tally = load.tally
    report(f"operator deleted mid-rollout: operator back {back:.1f}s, resource Ready at its new generation "
           f"{rollout:.1f}s after the patch; deleted at a scale 2 -> 3: back {back_scale:.1f}s, Ready with 3 "
           f"{scale:.1f}s after the scale; streams: {tally}")
    record("operator deleted mid-rollout -> resource Ready at its new generation", rollout)
    assert not tally.cut, tally.cut[:5]
    assert not tally.failed, tally.failed[:5]


# -- 4. a model pod killed by its memory limit ---------------------------------------------------------------

def test_a_pod_killed_by_its_memory_limit_turns_the_resource_degraded(operator_pod, namespace):
    ns, name = namespace, "tight"
    body = example(name, replicas=1)
    # torch and the model's float32 weights (540 MB) need far more than this.
    body["spec"]["resources"] = {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"memory": "200Mi"}}
    t0 = time.monotonic()
    apply(body, ns)

    def degraded():
        cond = condition(get("csd", name, ns), "Degraded")
        return cond.get("status") == "True" and cond

    first = wait_for("Degraded", degraded, timeout=300, interval=1)
    took = time.monotonic() - t0
    # The kernel's verdict, as the kubelet recorded it.
    def killed():
        for p in model_pods(name, ns):
            for cs in p["status"].get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
                if term.get("reason") == "OOMKilled":
                    return cs
        return None
    container = wait_for("a container OOMKilled", killed, timeout=120)
    # Status keeps saying why through the restarts (terminated, back-off, starting again).
    samples = [first]
    for _ in range(5):
        time.sleep(8)
        samples.append(condition(get("csd", name, ns), "Degraded"))
    csd = get("csd", name, ns)
    report(f"memory limit 200Mi: Degraded after {took:.1f}s, the container OOMKilled "
           f"(exit {((container.get('lastState') or {}).get('terminated') or {}).get('exitCode')}, "
           f"{container.get('restartCount')} restarts); status said: "
           f"{sorted({(s.get('reason'), s.get('status')) for s in samples})}")
    record("memory limit too small -> Degraded", took)
    assert condition(csd, "Ready").get("status") == "False"
    for s in samples:
        assert s.get("status") == "True", f"Degraded went away while the pod still cannot run: {s}"
        assert "OOMKilled" in f"{s.get('reason')} {s.get('message')}", f"status does not say OOMKilled: {s}"
        assert "chatstream" in s.get("message", ""), f"the message names no container: {s}"


# -- 5. many connections that read nothing (slowloris) -------------------------------------------------------

def paced(url: str, clients: int = 2, streams: int = 2, max_tokens: int = 48) -> dict:
    """`clients` users streaming one after another: the gaps between their tokens and their first tokens."""
    def user(u: int) -> tuple[list[float], list[float]]:
        gaps, firsts = [], []
        for s in range(streams):
            body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"{STORY} ({u}.{s})"}]}
            stream = ChatEvents()
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120,
                              headers={"X-Session-Id": f"paced-{u}"}) as r:
                assert r.status_code == 200, r.read()
                stream.read(r.iter_lines())
            firsts.append(stream.first_token)
            gaps += stream.gaps
        return gaps, firsts
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(user, range(clients)))
    gaps = sorted(g for r in results for g in r[0])
    return {"p50": statistics.median(gaps), "p90": gaps[int(0.9 * (len(gaps) - 1))],
            "ttft": statistics.median(f for r in results for f in r[1])}


class Slowloris:
    """`n` connections that send half a request and then nothing, and never read."""

    def __init__(self, host: str, port: int, n: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 16384:  # room for two attacks open at once and the test's own clients
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
        self.socks = []
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n")
            s.setblocking(False)
            self.socks.append(s)

    def still_open(self) -> int:
        """Connections the server has not closed (closing shows as readable, with b"" or an error)."""
        open_ = 0
        for s in self.socks:
            poll = select.poll()  # not select(): these descriptors are past its 1024
            poll.register(s, select.POLLIN)
            if not poll.poll(0):
                open_ += 1
                continue
            try:
                if s.recv(65536, socket.MSG_PEEK):
                    continue  # an answer (haproxy's 408) before the close: closed from the server's side
            except OSError:
                continue
        return open_

    def close(self) -> None:
        for s in self.socks:
            s.close()


def pod_nofile(ns: str, pod: str) -> str:
    return kubectl("exec", "-n", ns, pod, "-c", "chatstream", "--", "sh", "-c", "ulimit -n").stdout.strip()


def test_slowloris_at_the_router_and_at_a_pod(faulty):
    """Both attacks: first at the router (its bound: maxconn 2048 in all, `timeout http-request` 30 s to send a
    request), then, with those connections still open, at a pod directly (what the NetworkPolicy keeps
    clients from; uvicorn has no header timeout, so its bound is the container's file descriptors)."""
    ns, url = faulty
    host, port = url.removeprefix("http://").split(":")
    [pod] = [p for p in model_pods(NAME, ns) if pod_ready(p)][:1]
    ip, limit = pod["status"]["podIP"], pod_nofile(ns, pod["metadata"]["name"])
    direct = f"http://{ip}:8000"
    n_pod = min(SLOW_CONNECTIONS, int(limit) // 2) if limit.isdigit() else SLOW_CONNECTIONS
    base, base_pod = paced(url), paced(direct)
    at_router = at_pod = None
    try:
        at_router = Slowloris(host, int(port), SLOW_CONNECTIONS)
        opened = time.monotonic()
        under = paced(url)
        newcomer = stream_once(url, 16, 60)  # (outcome, detail, seconds)
        at_pod = Slowloris(ip, 8000, n_pod)
        opened_pod = time.monotonic()
        under_pod = paced(direct)
        newcomer_pod = stream_once(direct, 16, 60)
        time.sleep(max(0.0, 40 - (time.monotonic() - opened)))
        left = at_router.still_open()
        time.sleep(max(0.0, 40 - (time.monotonic() - opened_pod)))
        left_pod = at_pod.still_open()
    finally:
        for attack in (at_router, at_pod):
            if attack is not None:
                attack.close()
    report(f"slowloris: router, {SLOW_CONNECTIONS} idle connections: inter-token p50/p90 {under['p50'] * 1000:.0f}/"
           f"{under['p90'] * 1000:.0f} ms (without: {base['p50'] * 1000:.0f}/{base['p90'] * 1000:.0f}), TTFT "
           f"{under['ttft']:.2f}s (without: {base['ttft']:.2f}s), a new user's stream {newcomer[0]} in "
           f"{newcomer[2]:.1f}s, {left} of {SLOW_CONNECTIONS} still open after 40 s")
    report(f"slowloris: pod {ip} (nofile {limit}), {n_pod} more idle connections: inter-token p50/p90 "
           f"{under_pod['p50'] * 1000:.0f}/{under_pod['p90'] * 1000:.0f} ms (without: {base_pod['p50'] * 1000:.0f}/"
           f"{base_pod['p90'] * 1000:.0f}), a new user's stream {newcomer_pod[0]} in {newcomer_pod[2]:.1f}s, "
           f"{left_pod} of {n_pod} still open after 40 s")
    for label, b, u, new in (("router", base, under, newcomer), ("pod", base_pod, under_pod, newcomer_pod)):
        assert u["p50"] <= 2 * b["p50"] + 0.05, f"{label}: streams slowed from {b['p50']:.3f}s to {u['p50']:.3f}s a token"
        assert new[0] == "completed", f"{label}: a new user was not served while the idle connections were open: {new}"
    assert left <= SLOW_CONNECTIONS * 0.05, f"the router kept {left} idle connections past its 30 s request timeout"
