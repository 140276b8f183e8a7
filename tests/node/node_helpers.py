"""Helpers for the tests on the real node: what lands there, its figures, scripts in the
background. kubectl and polling: support.kube."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import yaml
from support import metrics
from support.kube import CLUSTER_DIR, ROOT, apply, condition, get, get_list, wait_for

NODE_NAME = "chatstream-node"
TAINT_KEY = "chatstream.io/real-node"
OPERATOR_IMAGE = "localhost/chatstream-operator:0.1.0"
SERVICE_IMAGE = "localhost/chatstream:0.1.0"
ROUTER_IMAGE = "localhost/chatstream-router:0.1.0"
REDIS_IMAGE = "localhost/chatstream-test-redis:bookworm"
QUESTION = "What is the capital of France?"

# What a pod needs to land on the real node (the tests' cluster taints it so
# that the kwok tests never start real containers there).
ON_REAL_NODE = {
    "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
    "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
}

# spec.sessions of a resource whose sessions live in the Redis of redis()
REDIS_SESSIONS = {"store": "redis", "redisURLSecretRef": {"name": "sessions"}}

TIMINGS: list[str] = []


def record(what: str, value: float, unit: str = "s") -> None:
    """A figure the session prints at its end (pytest -ra shows no stdout)."""
    line = f"{what}: {value:.1f}{unit}"
    TIMINGS.append(line)
    print(f"[figure] {line}")


def report(line: str) -> None:
    """A line of measured figures the session prints at its end."""
    TIMINGS.append(line)
    print(f"[figure] {line}")


class Background:
    """A script started now, beside the tests, its output in .cluster/NAME.log.
    ``wait`` fails the test with the end of that log if the script failed."""

    def __init__(self, name: str, *cmd: str):
        CLUSTER_DIR.mkdir(parents=True, exist_ok=True)
        self.cmd, self.log_path = cmd, CLUSTER_DIR / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.finished: float | None = None
        # The end is noted when it happens, not when a test asks: a cached build that ended at once
        # and was waited for ten minutes later took a second, not ten minutes.
        self._watcher = threading.Thread(target=self._note_end, daemon=True)
        self._watcher.start()

    def _note_end(self) -> None:
        self.proc.wait()
        self.finished = time.monotonic()

    def wait(self, timeout: float) -> float:
        """Seconds from the start until it was done."""
        if self.proc.wait(timeout=timeout) != 0:
            tail = self.log_path.read_text(errors="replace")[-4000:]
            pytest.fail(f"{' '.join(self.cmd)} failed (exit {self.proc.returncode}); the end of {self.log_path}:\n{tail}")
        self._watcher.join()
        return self.finished - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def model_pods(name: str, namespace: str) -> list[dict]:
    """The resource's model pods: its router's pods share the instance label, not the name label."""
    from chatstream_operator import resources
    return get_list("pods", namespace, resources.selector(name))


def example(name: str, replicas: int, cpu: str = "100m", **spec) -> dict:
    """manifests/examples/cpu-builtin.yaml as a user would apply it here:
    pinned to the real node (the model pods and the router), with a CPU
    request this 2-core machine can grant to several pods."""
    body = yaml.safe_load((ROOT / "manifests/examples/cpu-builtin.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"]["replicas"] = replicas
    body["spec"]["resources"]["requests"]["cpu"] = cpu
    body["spec"].update(ON_REAL_NODE)
    body["spec"]["routing"] = dict(ON_REAL_NODE)  # the router (on by default) really runs too
    body["spec"].update(spec)
    return body


def service_url(name: str, namespace: str) -> str:
    svc = get("service", name, namespace)
    assert svc, f"no Service {namespace}/{name}"
    return f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


def on_node(ns: str, name: str, port: int, container: dict, **pod) -> None:
    """One pod of `container` (named `name`, serving `port`) on the real node, and a Service
    `name` in front of it; `pod`: more of the pod's spec (volumes)."""
    labels = {"app": name}
    apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {**ON_REAL_NODE, **pod,
                     "containers": [{"name": name, "ports": [{"containerPort": port}], **container}]},
        }},
    }, ns)
    apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
           "spec": {"selector": labels, "ports": [{"port": port}]}}, ns)


def redis(ns: str, image: str) -> None:
    """A real Redis as a pod (Debian's redis-server, tests/node/images), its URL
    in the Secret `sessions` (key `url`), as a user would give it to
    spec.sessions.redisURLSecretRef (REDIS_SESSIONS)."""
    on_node(ns, "redis", 6379, {"image": image, "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}},
                                "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 2}})
    apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sessions"},
           "stringData": {"url": f"redis://redis.{ns}.svc:6379/0"}}, ns)


def csd_ready(name: str, ns: str, generation: int | None = None) -> bool:
    """Ready with its router; with `generation`, that generation rolled out (Progressing False)."""
    csd = get("csd", name, ns)
    ready = condition(csd, "Ready")
    return (ready.get("status") == "True" and condition(csd, "RouterReady").get("status") == "True"
            and (generation is None or (ready.get("observedGeneration") == generation
                                        and csd["status"].get("observedGeneration") == generation
                                        and condition(csd, "Progressing").get("status") == "False")))


def deploy_with_redis(name: str, ns: str, redis_image: str, replicas: int = 2, **spec) -> None:
    """A Redis pod, and the example ChatStreamDeployment `name` keeping its sessions there (REDIS_SESSIONS),
    waited for until Ready with its router."""
    redis(ns, redis_image)
    apply(example(name, replicas=replicas, sessions=REDIS_SESSIONS, **spec), ns)
    wait_for(f"{name} Ready with its router", lambda: csd_ready(name, ns), timeout=600, interval=1)


def answered(pod_ip: str) -> int:
    """Streams this pod has finished (its own /metrics)."""
    return int(metrics.total(metrics.scrape(f"http://{pod_ip}:8000"), "chatstream_outcomes_total", default=0))
