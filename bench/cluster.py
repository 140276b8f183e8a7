"""The product on Kubernetes against one bare process, on the same machine in the same run.

    .venv/bin/python bench/cluster.py [--replicas 1,2,4] [--users 4] [--turns 6] [--new-tokens 48]
        [--rounds 2] [--env NAME=VALUE ...] [--keep]

What it does, as a user would run it:
  1. brings up the real node (scripts/cluster-up.sh; `make cluster`'s layout when it starts
     the cluster itself: no fake nodes), builds the images and imports them
     (scripts/build-images.sh, scripts/node-up.sh import), installs the chart (the operator
     runs as a pod);
  2. for each replica count: applies manifests/examples/cpu-builtin.yaml with that many
     replicas, each asking for its share of the node's free CPU (allocatable minus what
     the node's other pods and the router request, split evenly: the rule
     docs/operator.md gives), waits until it is Ready and its router has every pod, warms
     each pod, then runs the fixed multi-turn workload (bench/lib/conversations.py: U users
     x T turns over /v1/chat/completions, greedy, the whole history each turn) through
     the router's Service from the host;
  3. deletes the resource and runs the same workload against one bare `chatstream serve`
     on the host, before the pods and again after them (the control plane stays up and
     idle, as it would on the node).
Prints tok/s, TTFT p50 per turn, inter-token p50, the prefix-cache hit rate and every
ratio against the bare process (the mean of its runs), with the CPU model. Writes
bench/results/<date>-cluster.json/.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from lib.conversations import run_workload
from lib.environment import machine, model_dir
from lib.host import RESULTS, ROOT, log, sh as run_sh, wait_for_quiet
from lib.results import write_results
from lib.servers import Ours, Server, read_metrics

BIN = Path(os.environ.get("CHATSTREAM_K8S_CACHE", Path.home() / ".cache/chatstream-k8s")) / "bin"
KUBECONFIG = ROOT / ".cluster" / "kubeconfig"
NODE = "chatstream-node"
NAMESPACE = "bench-cluster"
NAME = "bench"
MODEL = "smollm2-135m-instruct"
IMAGES = ("localhost/chatstream-operator:0.1.0", "localhost/chatstream:0.1.0", "localhost/chatstream-router:0.1.0")
# On the real node whatever the cluster's layout (the tests' layout taints it).
PINNED = {"nodeSelector": {"kubernetes.io/hostname": NODE},
          "tolerations": [{"key": "chatstream.io/real-node", "operator": "Exists", "effect": "NoSchedule"}]}


def kube_env() -> dict:
    return {**os.environ, "KUBECONFIG": str(KUBECONFIG), "PATH": f"{BIN}:{os.environ['PATH']}"}


def sh(*cmd: str, input: str | None = None, timeout: float = 1800) -> str:
    out = subprocess.run(cmd, input=input, capture_output=True, text=True, env=kube_env(), timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def kubectl_json(*args: str) -> dict:
    return json.loads(sh("kubectl", *args, "-o", "json"))


def step(what: str, *cmd: str, **env: str) -> None:
    """A long step with its own progress on the terminal."""
    log(f"== {what}")
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env={**kube_env(), **env})
    log(f"   {what}: {time.monotonic() - t0:.0f}s")


def cluster_up() -> None:
    up = KUBECONFIG.exists() and subprocess.run(["kubectl", "get", "--raw", "/readyz"], env=kube_env(),
                                                capture_output=True).returncode == 0
    # Started here: `make cluster`'s layout (no fake nodes). Already up: as it is (pods are pinned).
    step("cluster-up", "bash", str(ROOT / "scripts/cluster-up.sh"), **({} if up else {"CHATSTREAM_FAKE_NODES": "0"}))
    step("build images", "bash", str(ROOT / "scripts/build-images.sh"))
    step("import images", str(ROOT / "scripts/node-up.sh"), "import", *IMAGES)
    log("== helm install (the operator runs as a pod)")
    sh("helm", "upgrade", "--install", "chatstream", str(ROOT / "charts/chatstream"), "--namespace",
       "chatstream-system", "--create-namespace", "--set-json", f"nodeSelector={json.dumps(PINNED['nodeSelector'])}",
       "--set-json", f"tolerations={json.dumps(PINNED['tolerations'])}", "--wait", "--timeout", "180s")
    sh("kubectl", "wait", "--for=condition=Established", "crd/chatstreamdeployments.chatstream.io", "--timeout=60s")
    subprocess.run(["kubectl", "create", "namespace", NAMESPACE], env=kube_env(), capture_output=True)


def millicpu(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def cpu_share(replicas: int) -> int:
    """Millicores per model pod: the node's allocatable CPU less what its other pods (and the
    router this resource will get) request, split evenly, rounded down to 10m."""
    from chatstream_operator import router
    node = kubectl_json("get", "node", NODE)
    allocatable = millicpu(node["status"]["allocatable"]["cpu"])
    pods = kubectl_json("get", "pods", "-A", "--field-selector", f"spec.nodeName={NODE}")["items"]
    taken = sum(millicpu(c.get("resources", {}).get("requests", {}).get("cpu", "0"))
                for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")
                and p["metadata"]["namespace"] != NAMESPACE for c in p["spec"]["containers"])
    free = allocatable - taken - millicpu(router.ROUTER_RESOURCES["requests"]["cpu"])
    return max(10, (free // replicas) // 10 * 10)


def resource(replicas: int, cpu_m: int, env: list[dict]) -> dict:
    body = yaml.safe_load((ROOT / "manifests/examples/cpu-builtin.yaml").read_text())
    body["metadata"] = {"name": NAME, "namespace": NAMESPACE}
    spec = body["spec"]
    spec["replicas"] = replicas
    spec["resources"]["requests"]["cpu"] = f"{cpu_m}m"
    spec.pop("tracing", None)  # no trace backend here: a sampler exporting nowhere would only add work
    spec.update(PINNED)
    spec["routing"] = dict(PINNED)
    if env:
        spec["env"] = env
    return body


def condition(obj: dict, kind: str) -> bool:
    return any(c["type"] == kind and c["status"] == "True" for c in obj.get("status", {}).get("conditions", []))


def wait(what: str, fn, timeout: float = 600, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := fn():
                return value
        except (RuntimeError, OSError, ValueError):
            pass
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def model_pods() -> list[dict]:
    from chatstream_operator import resources
    return kubectl_json("get", "pods", "-n", NAMESPACE, "-l", resources.selector(NAME))["items"]


def ready_ips() -> list[str]:
    return [p["status"]["podIP"] for p in model_pods() if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def router_servers_up(base: str, want: int) -> bool:
    """The router sends to every ready pod (its own Prometheus exporter: servers UP in the backend)."""
    from chatstream_operator import router
    labels = ",".join(f"{k}={v}" for k, v in router.router_labels(NAME).items())
    pods = kubectl_json("get", "pods", "-n", NAMESPACE, "-l", labels)["items"]
    ips = [p["status"]["podIP"] for p in pods if not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP")]
    metrics = [read_metrics(f"http://{ip}:{router.MONITOR_PORT}") or {} for ip in ips]
    return (len(ips) == 1 and metrics[0].get("haproxy_backend_active_servers", 0) >= want
            and read_metrics(base) is not None)


def deploy(replicas: int, env: list[dict]) -> tuple[str, list[str], int]:
    cpu_m = cpu_share(replicas)
    sh("kubectl", "apply", "-f", "-", input=yaml.safe_dump(resource(replicas, cpu_m, env)))
    t0 = time.monotonic()

    def ready():
        csd = kubectl_json("get", "csd", "-n", NAMESPACE, NAME)
        return (condition(csd, "Ready") and condition(csd, "RouterReady")
                and csd["status"].get("readyReplicas") == replicas and len(ready_ips()) == replicas)

    wait(f"{replicas} ready pods and the router", ready)
    svc = kubectl_json("get", "service", "-n", NAMESPACE, f"{NAME}-router")
    base = f"http://{svc['spec']['clusterIP']}:8000"
    wait("the router sending to every pod", lambda: router_servers_up(base, replicas), timeout=120)
    log(f"   {replicas} pods of {cpu_m}m CPU each Ready in {time.monotonic() - t0:.0f}s")
    return base, ready_ips(), cpu_m


def undeploy() -> None:
    subprocess.run(["kubectl", "delete", "csd", "-n", NAMESPACE, NAME, "--ignore-not-found", "--wait=true"],
                   env=kube_env(), capture_output=True, timeout=300)
    wait("the model pods gone", lambda: not model_pods(), timeout=300)


def pod_threads(base: str) -> str:
    """What chatstream_engine_info says of the model's threads and its linear kernel."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next((l for l in text.splitlines() if l.startswith("chatstream_engine_info{")), "{}")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    return f"{labels.get('threads', '?')} ({labels.get('threads_from', '?')}, {labels.get('cpu_linear', '?')})"


# Users of the warm-up: conversations (openers) no round holds, so that no round finds its first turn cached.
WARM_USERS = 12


async def warm(base: str | list[str], users: int) -> None:
    """One short turn per pod (the router spreads new conversations by load), nothing kept."""
    await run_workload("v1", base, MODEL, users, 1, 8, first_user=WARM_USERS, log=lambda *_: None)


def measure(base: str | list[str], servers: list[str], args, round_: int) -> dict:
    """Round ``round_`` of the workload through ``base`` (or spread over several), each round its own users
    (a round that repeated the last one's conversations would find them cached); the cache counters summed
    over ``servers``."""
    asyncio.run(warm(base, max(2, len(servers))))
    before = {s: read_metrics(s) or {} for s in servers}
    run = asyncio.run(run_workload("v1", base, MODEL, args.users, args.turns, args.new_tokens,
                                   first_user=round_ * args.users, log=log))
    after = {s: read_metrics(s) or {} for s in servers}
    ok = [r for r in run.records if r.ok]
    tokens = sum(r.tokens or 0 for r in ok)
    wall = run.end - run.t0
    gaps = sorted(b - a for r in ok for a, b in zip(r.events, r.events[1:]))
    hit = [sum(after[s].get(k, 0) - before[s].get(k, 0) for s in servers)
           for k in ("chatstream_prompt_tokens_cached_total", "chatstream_prompt_tokens_total")]
    return {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "errors": len(run.records) - len(ok),
            "ttft_p50_ms": [statistics.median(r.ttft_ms for r in ok if r.turn == t) for t in range(args.turns)],
            "itl_p50_ms": statistics.median(gaps) * 1000 if gaps else None,
            "hit_rate": hit[0] / hit[1] if hit[1] else None}


class Threads(Ours):
    """Ours with the pods' thread count and environment (--split)."""

    def __init__(self, threads: int, env: list[dict]):
        super().__init__()
        self.threads, self.extra = threads, {e["name"]: e["value"] for e in env}

    def env(self) -> dict:
        return {**super().env(), **self.extra, "CHATSTREAM_THREADS": str(self.threads)}


def bare(args, model_path: str, processes: int = 1, threads: int = 0, env: list[dict] = ()) -> dict:
    """One bare process with every core; or ``processes`` of them with ``threads`` each, the users
    spread over them as the router spreads them over pods: the pods' shape without Kubernetes."""
    servers = [Server(Threads(threads, env) if threads else Ours(), model_path, 4, 256, log=log)
               for _ in range(processes)]
    try:
        for server in servers:  # the example's limits: 4 streams, a queue of 16 (4 x 4), 2048 tokens of context
            server.start()
        bases = [s.base for s in servers]
        runs = [measure(bases if processes > 1 else bases[0], bases, args, i) for i in range(args.rounds)]
        return best(runs) | {"threads": ", ".join(pod_threads(b) for b in bases),
                             "rounds": [r["tok_s"] for r in runs]}
    finally:
        for server in servers:
            server.stop()


def best(runs: list[dict]) -> dict:
    """The median round by tok/s (its own TTFT and inter-token figures)."""
    return sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]


def render(report: dict) -> str:
    bare_tok = statistics.mean(r["tok_s"] for r in report["bare"])
    bare_itl = statistics.mean(r["itl_p50_ms"] for r in report["bare"])
    lines = [f"# ChatStream on the real node against one bare process ({report['date']})", "",
             f"CPU: {report['machine']['cpu_model']} ({report['machine']['cores']} cores, "
             f"{', '.join(report['machine']['cpu_simd'])}); commit {report['commit']}.",
             f"Workload: {report['args']['users']} users x {report['args']['turns']} turns over /v1/chat/completions, "
             f"{report['args']['new_tokens']} new tokens, greedy; {report['args']['rounds']} rounds per setup "
             "(the median round shown); pods through their router's Service from the host.",
             f"Pod env: {report['args']['env'] or 'none beyond the operator'}.", "",
             "| setup | CPU request | threads | tok/s | / bare | TTFT p50 turn 1 -> last (ms) | inter-token p50 (ms) | / bare | cache hit | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(label, cpu, threads, r):
        hit = "n/a" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}"
        return (f"| {label} | {cpu} | {threads} | {r['tok_s']:.1f} | {r['tok_s'] / bare_tok:.2f}x | "
                f"{r['ttft_p50_ms'][0]:.0f} -> {r['ttft_p50_ms'][-1]:.0f} | {r['itl_p50_ms']:.0f} | "
                f"{r['itl_p50_ms'] / bare_itl:.2f}x | {hit} | {r['errors']} |")

    for i, r in enumerate(report["bare"]):
        lines.append(row(f"bare process ({'before' if i == 0 else 'after'})", "-", r["threads"], r))
    for n, setup in report["pods"].items():
        lines.append(row(f"{n} replica{'s' if int(n) > 1 else ''} via the router", f"{setup['cpu_m']}m",
                         ", ".join(setup["threads"]), best(setup["runs"])))
        if "split" in setup:
            lines.append(row(f"{n} bare processes, users spread", "-", setup["split"]["threads"], setup["split"]))
    rounds = [f"{n} replicas " + " / ".join(f"{r['tok_s']:.1f}" for r in s["runs"]) for n, s in report["pods"].items()]
    rounds.append("bare " + " / ".join(f"{t:.1f}" for r in report["bare"] for t in r["rounds"]))
    lines += ["", "Every round's tok/s: " + "; ".join(rounds) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2, help="workload runs per setup (the median is reported)")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the model pods (spec.env)")
    ap.add_argument("--no-bare", action="store_true", help="only the pods")
    ap.add_argument("--split", action="store_true",
                    help="after each replica count, as many bare processes with the pods' threads and env")
    ap.add_argument("--keep", action="store_true", help="leave the last resource running")
    ap.add_argument("--tag", default="", help="suffix of the results files")
    args = ap.parse_args()
    if args.users * args.rounds > WARM_USERS:
        ap.error(f"--users x --rounds is at most {WARM_USERS} (the conversations of every round differ)")
    env = [{"name": k, "value": v} for k, v in (e.split("=", 1) for e in args.env)]
    model_path = model_dir(None)
    report = {"date": dt.date.today().isoformat(), "machine": machine(), "args": vars(args), "pods": {}, "bare": [],
              "commit": run_sh(["git", "rev-parse", "--short", "HEAD"])}
    cluster_up()
    undeploy()
    # An image import leaves GBs of dirty pages: the first bare run measured 60-65 tok/s where the one
    # after the pods measured 76-82. Flushed, and the load average let settle.
    os.sync()
    report["quiet"] = wait_for_quiet(1.0, 300)

    def bare_alone(when: str) -> None:
        if not args.no_bare:
            log(f"== bare process ({when})")
            report["bare"].append(bare(args, model_path))
            log(f"   {report['bare'][-1]['tok_s']:.1f} tok/s, threads {report['bare'][-1]['threads']}")

    bare_alone("before the pods")
    for n in map(int, args.replicas.split(",")):
        log(f"== {n} replica(s)")
        base, ips, cpu_m = deploy(n, env)
        pods = [f"http://{ip}:8000" for ip in ips]
        setup = {"cpu_m": cpu_m, "threads": [pod_threads(p) for p in pods], "runs": []}
        for i in range(args.rounds):
            setup["runs"].append(measure(base, pods, args, i))
            log(f"   round {i + 1}: {setup['runs'][-1]['tok_s']:.1f} tok/s, threads {setup['threads']}")
        report["pods"][str(n)] = setup
        if args.split and n > 1:
            undeploy()
            threads = int(setup["threads"][0].split()[0])
            log(f"== {n} bare processes of {threads} thread(s), the users spread over them")
            setup["split"] = bare(args, model_path, n, threads, env)
            log(f"   {setup['split']['tok_s']:.1f} tok/s")
        if not (args.keep and n == int(args.replicas.split(",")[-1])):
            undeploy()
    bare_alone("after the pods")
    stem = RESULTS / f"{report['date']}-cluster{('-' + args.tag) if args.tag else ''}"
    text = render(report) if report["bare"] else json.dumps(report["pods"], indent=1)
    print("\n" + text)
    write_results(stem, report, text, indent=1)
    log(f"wrote {stem}.md/.json")


if __name__ == "__main__":
    main()
