"""The model cache on the real node (spec.model.cache): a Job fills a claim
once, two pods of one hf: model both start from it without downloading, and
a pod of the same model without a cache downloads it, for comparison.

The hub cannot be reached from this machine (pods have no route out), so a
pod in the test's namespace stands in for it: tests/support/hub_mirror.py,
shipped in a ConfigMap and run with the service image's python, serves the
builtin model's converted directory (baked into that image) over HTTP in the
layout huggingface_hub expects, gated by a token. The fill Job and the
comparison pod reach it through HF_ENDPOINT in spec.env and get the token from
spec.model.tokenSecretRef: the download is the real library's, only the
server is a stand-in (on the same machine, so a download here is far faster
than one from the hub).

Storage: the node has no dynamic provisioner, so the test makes a `local`
PersistentVolume on a directory of this machine (the node's disk), pre-bound
(claimRef) to the claim the operator makes for spec.model.cache.size, and
removes both afterwards.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time

import httpx
import pytest
from node_helpers import (
    CACHE, NODE_NAME, ON_REAL_NODE, QUESTION, ROOT, SERVICE_IMAGE, apply, condition, example, get, get_list, kubectl,
    model_pods, record, report, service_url, wait_for,
)

pytestmark = pytest.mark.node

REPO = "chatstream-tests/smollm2"
TOKEN = "hf_chatstream_node_test"
BAKED = "/opt/chatstream/models/smollm2-135m-instruct"  # in the service image
STORAGE_CLASS = "chatstream-test-local"  # no StorageClass object: the claim binds to the volume made here
UID = 10001  # the pods' user and group (resources.UID)


def mirror_requests(ns: str) -> list[str]:
    logs = kubectl("logs", "-n", ns, "deployment/hub-mirror").stdout
    return [line for line in logs.splitlines() if line.startswith("REQUEST")]


@pytest.fixture
def hub(namespace):
    """The hub stand-in, its Service, and the token Secret the resources name."""
    ns, labels = namespace, {"app": "hub-mirror"}
    kubectl("create", "configmap", "hub-mirror", "-n", ns, f"--from-file=hub_mirror.py={ROOT / 'tests/support/hub_mirror.py'}")
    kubectl("create", "secret", "generic", "hub-token", "-n", ns, f"--from-literal=token={TOKEN}")
    apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hub-mirror"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {**ON_REAL_NODE, "containers": [{
                "name": "mirror", "image": SERVICE_IMAGE, "imagePullPolicy": "Never",
                "command": ["python", "/mirror/hub_mirror.py", "--repo", f"{REPO}={BAKED}", "--port", "8080",
                            "--token", TOKEN],
                "ports": [{"containerPort": 8080}],
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                "volumeMounts": [{"name": "mirror", "mountPath": "/mirror"}],
            }], "volumes": [{"name": "mirror", "configMap": {"name": "hub-mirror"}}]},
        }},
    }, ns)
    apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hub-mirror"},
           "spec": {"selector": labels, "ports": [{"port": 8080}]}}, ns)
    kubectl("rollout", "status", "-n", ns, "deployment/hub-mirror", "--timeout=120s", timeout=150)
    return f"http://hub-mirror.{ns}.svc:8080"


@pytest.fixture
def local_volume(namespace):
    """A local PersistentVolume on this machine's disk for the claim of the resource `cached`."""
    ns = namespace
    path = CACHE / "node" / "volumes" / ns
    path.mkdir(parents=True)
    os.chown(path, UID, UID)  # the fill Job writes as the pods' user
    name = f"chatstream-model-cache-{ns}"
    apply({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "2Gi"}, "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
            "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
            "claimRef": {"namespace": ns, "name": "cached-model-cache"},
            "local": {"path": str(path)},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}]}]}},
        },
    }, ns)
    yield path
    kubectl("delete", "csd", "--all", "-n", ns, "--wait=true", check=False, timeout=120)
    try:
        wait_for("the pods to go", lambda: not get_list("pods", ns, "app.kubernetes.io/instance"), timeout=90)
    except AssertionError:
        pass
    kubectl("delete", "pv", name, "--wait=false", check=False)
    shutil.rmtree(path, ignore_errors=True)


def resource(name: str, endpoint: str, replicas: int, cache: dict | None) -> dict:
    body = example(name, replicas=replicas, shutdownGraceSeconds=0,
                   env=[{"name": "HF_ENDPOINT", "value": endpoint}],
                   routing={"enabled": False, **ON_REAL_NODE})
    body["spec"]["model"] = {"source": f"hf:{REPO}", "device": "cpu", "dtype": "float32",
                             "tokenSecretRef": {"name": "hub-token"}}
    if cache:
        body["spec"]["model"]["cache"] = cache
    return body


def _time(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp)


def start_figures(pod: dict, ns: str) -> tuple[float, float]:
    """(created -> serving, container started -> serving), in seconds: the
    server logs "loaded; serving" once the model is loaded, and kubectl's
    --timestamps gives that line's time to the nanosecond (the pod's
    conditions only to the second, its probes every 5 s)."""
    name = pod["metadata"]["name"]
    logs = kubectl("logs", "-n", ns, name, "-c", "chatstream", "--timestamps").stdout
    [line] = [line for line in logs.splitlines() if "loaded; serving" in line]
    serving = _time(line.split()[0])
    [status] = pod["status"]["containerStatuses"]
    started = _time(status["state"]["running"]["startedAt"])
    created = _time(pod["metadata"]["creationTimestamp"])
    return (serving - created).total_seconds(), (serving - started).total_seconds()


def ready(name: str, ns: str, timeout: float) -> dict:
    return wait_for(f"{name} Ready", lambda: condition(get("csd", name, ns), "Ready").get("status") == "True"
                    and get("csd", name, ns), timeout=timeout, interval=1)


def answer(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": REPO, "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": QUESTION}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_two_pods_start_from_the_cache_without_downloading(operator_pod, namespace, hub, local_volume):
    ns = namespace
    t0 = time.monotonic()
    apply(resource("cached", hub, replicas=2, cache={"size": "2Gi", "storageClassName": STORAGE_CLASS}), ns)

    # The fill: one Job, progress in its log, then ModelCached.
    wait_for("ModelCached=True", lambda: condition(get("csd", "cached", ns), "ModelCached").get("status") == "True",
             timeout=300, interval=1)
    record("model cache: kubectl apply -> ModelCached", time.monotonic() - t0)
    [job] = get_list("jobs", ns)
    assert job["status"].get("succeeded") == 1 and not job["status"].get("failed"), job["status"]
    fill_log = kubectl("logs", "-n", ns, f"job/{job['metadata']['name']}").stdout
    assert f"downloading {REPO}@main from {hub}" in fill_log, fill_log
    assert "Fetching 6 files" in fill_log and f"filled hf:{REPO}@main" in fill_log, fill_log
    fill_seconds = float(fill_log.split(" MB in ")[1].split()[0])
    record("model cache: the Job's download (snapshot_download, 0.54 GB from the in-cluster mirror)", fill_seconds)
    filled = mirror_requests(ns)
    assert any(f"/{REPO}/resolve/" in r and "model.safetensors" in r for r in filled), filled
    assert (local_volume / "ready").is_dir() and (local_volume / "hub" / "models--chatstream-tests--smollm2").is_dir()

    # Both pods start from the cache: offline, the claim read-only, and the mirror asked nothing more.
    ready("cached", ns, timeout=300)
    pods = model_pods("cached", ns)
    assert len(pods) == 2
    for pod in pods:
        [c] = pod["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in env
        assert {"name": "model-cache", "mountPath": "/var/cache/chatstream-models", "readOnly": True} in c["volumeMounts"]
        [wait] = pod["status"]["initContainerStatuses"]
        assert wait["name"] == "wait-for-cache" and wait["state"]["terminated"]["exitCode"] == 0
    assert mirror_requests(ns) == filled, "a pod asked the hub although the cache held the model"
    assert "Paris" in wait_for("a chat answered from the cached model", lambda: answer(service_url("cached", ns)),
                               timeout=60)
    starts = sorted(start_figures(p, ns) for p in pods)
    for i, (total, load) in enumerate(starts, 1):
        report(f"model cache: pod {i} of 2 started from the cache: container start -> serving {load:.1f}s "
               f"(pod created -> serving {total:.1f}s, with the wait for the fill)")

    # For comparison: the same model without a cache, so the pod downloads it as it starts.
    t1 = time.monotonic()
    apply(resource("fresh", hub, replicas=1, cache=None), ns)
    ready("fresh", ns, timeout=300)
    [pod] = model_pods("fresh", ns)
    total, load = start_figures(pod, ns)
    report(f"model cache: a pod without the cache, downloading as it starts: container start -> serving {load:.1f}s "
           f"(pod created -> serving {total:.1f}s; kubectl apply -> Ready {time.monotonic() - t1:.1f}s)")
    downloaded = mirror_requests(ns)[len(filled):]
    assert any("model.safetensors" in r and r.split()[-1] == "200" for r in downloaded), downloaded
    assert not get_list("persistentvolumeclaims", ns, "app.kubernetes.io/instance=fresh")
