"""The model cache on the real node (spec.model.cache): a Job fills a claim
once; two pods of one hf: model both start from it without downloading and
answer as the bare model does; a replaced pod reads the same cache; a pod of
the same model without a cache downloads it as it starts, for comparison.

The hub cannot be reached from this machine (pods have no route out), so a
pod in the test's namespace stands in for it: tests/support/hub_mirror.py,
shipped in a ConfigMap and run with the service image's python, serves the
builtin model's converted directory (baked into that image) over HTTP in the
layout huggingface_hub expects, gated by a token. The fill Job and the
comparison pod reach it through HF_ENDPOINT in spec.env and get the token from
spec.model.tokenSecretRef: the download is the real library's, only the
server is a stand-in (on the same machine, so a download here is far faster
than one from the hub). The mirror logs every request: that log is how the
test counts downloads.

Storage: the node has no dynamic provisioner, so the test makes a `local`
PersistentVolume on a directory of this machine (the node's disk), pre-bound
(claimRef) to the claim the operator makes for spec.model.cache.size, and
removes both afterwards.

About 2-3 minutes on the 2-core machine once the images are in containerd.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time

import httpx
import pytest
from node_helpers import NODE_NAME, ON_REAL_NODE, QUESTION, SERVICE_IMAGE, example, model_pods, on_node, record, report
from support.kube import CACHE, RELEASE_NS, ROOT, apply, condition, get, get_list, kubectl, pod_ready, wait_for

pytestmark = pytest.mark.node

REPO = "chatstream-tests/smollm2"
TOKEN = "hf_chatstream_node_test_0123456789"
BAKED = "/opt/chatstream/models/smollm2-135m-instruct"  # in the service image
STORAGE_CLASS = "chatstream-test-local"  # no StorageClass object: the claim binds to the volume made here
UID = 10001  # the pods' user and group (resources.UID)
MAX_TOKENS = 16
WEIGHTS = "model.safetensors"


def mirror_requests(ns: str) -> list[str]:
    """The mirror's request log: `REQUEST <time> <method> <path> <status>`."""
    logs = kubectl("logs", "-n", ns, "deployment/hub-mirror").stdout
    return [line for line in logs.splitlines() if line.startswith("REQUEST")]


def weight_downloads(requests: list[str]) -> int:
    """Whole downloads of the weights (HEADs ask only for the metadata)."""
    return sum(1 for r in requests if r.split()[2] == "GET" and r.split()[3].endswith(f"/{WEIGHTS}")
               and r.split()[4] in ("200", "206"))


@pytest.fixture
def hub(namespace):
    """The hub stand-in, its Service, and the token Secret the resources name."""
    ns = namespace
    kubectl("create", "configmap", "hub-mirror", "-n", ns, f"--from-file=hub_mirror.py={ROOT / 'tests/support/hub_mirror.py'}")
    kubectl("create", "secret", "generic", "hub-token", "-n", ns, f"--from-literal=token={TOKEN}")
    on_node(ns, "hub-mirror", 8080, {
        "image": SERVICE_IMAGE, "imagePullPolicy": "Never",
        "command": ["python", "/mirror/hub_mirror.py", "--repo", f"{REPO}={BAKED}", "--port", "8080", "--token", TOKEN],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
        "volumeMounts": [{"name": "mirror", "mountPath": "/mirror"}],
    }, volumes=[{"name": "mirror", "configMap": {"name": "hub-mirror"}}])
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


@pytest.fixture(scope="module")
def bare_answer() -> str:
    """transformers' greedy answer of the same weights on this machine: the
    image's baked directory that the mirror serves is the builtin model
    converted by the same code as ~/.cache/chatstream's. Computed before any
    pod starts, so that it takes no CPU from them."""
    import torch

    from chatstream.loader import load_model
    model, tok = load_model("builtin:smollm2-135m-instruct", device="cpu", dtype="float32")
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


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


def ready_pods(name: str, ns: str, count: int, timeout: float, gone: str = "") -> list[dict]:
    """The resource's `count` pods once all are Ready, no other is left, and
    none is the pod named `gone`."""
    def pods():
        live = [p for p in model_pods(name, ns) if not p["metadata"].get("deletionTimestamp")]
        ok = len(live) == count and all(pod_ready(p) and p["metadata"]["name"] != gone for p in live)
        return live if ok else None
    return wait_for(f"{count} Ready pod(s) of {name}", pods, timeout=timeout, interval=1)


def answer(pod: dict) -> str:
    """A greedy answer from that pod itself (its IP), not through the Service."""
    r = httpx.post(f"http://{pod['status']['podIP']}:8000/v1/chat/completions", timeout=60, json={
        "model": REPO, "temperature": 0, "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": QUESTION}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def assert_reads_the_cache(pod: dict) -> None:
    """Offline, the claim read-only, no token, and it waited for the fill."""
    [c] = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in env, env
    assert {"name": "model-cache", "mountPath": "/var/cache/chatstream-models", "readOnly": True} in c["volumeMounts"]
    [wait] = pod["status"]["initContainerStatuses"]
    assert wait["name"] == "wait-for-cache" and wait["state"]["terminated"]["exitCode"] == 0, wait


def test_two_pods_share_one_download_and_a_replaced_pod_reads_the_cache(operator_pod, namespace, hub, local_volume,
                                                                       bare_answer):
    ns = namespace
    assert "Paris" in bare_answer, bare_answer  # the reference itself is right
    t0 = time.monotonic()
    apply(resource("cached", hub, replicas=2, cache={"size": "2Gi", "storageClassName": STORAGE_CLASS}), ns)

    # The fill: status says Filling (naming the Job), then Filled.
    seen = []

    def filled():
        cond = condition(get("csd", "cached", ns), "ModelCached")
        if cond and cond.get("reason") not in seen:
            seen.append(cond.get("reason"))
        return cond.get("status") == "True"
    wait_for("ModelCached=True", filled, timeout=180, interval=0.5)
    record("model cache: kubectl apply -> ModelCached (the Job's pod, the download, the ready file)",
           time.monotonic() - t0)
    assert seen[0] == "Filling" and seen[-1] == "Filled", seen

    # Once: one Job, one pod of it, one download of the weights.
    [job] = get_list("jobs", ns)
    assert job["status"].get("succeeded") == 1 and not job["status"].get("failed"), job["status"]
    assert len(get_list("pods", ns, f"batch.kubernetes.io/job-name={job['metadata']['name']}")) == 1
    fill_log = kubectl("logs", "-n", ns, f"job/{job['metadata']['name']}").stdout
    assert f"downloading {REPO}@main from {hub}" in fill_log, fill_log
    assert "Fetching 6 files" in fill_log and f"filled hf:{REPO}@main" in fill_log, fill_log
    [done] = [line for line in fill_log.splitlines() if line.startswith(f"filled hf:{REPO}@main: ")]
    report(f"model cache: the Job's download (snapshot_download from the in-cluster mirror): {done.split(': ', 1)[1]}")
    after_fill = mirror_requests(ns)
    assert weight_downloads(after_fill) == 1, after_fill
    assert (local_volume / "ready").is_dir() and (local_volume / "hub" / "models--chatstream-tests--smollm2").is_dir()

    # Both pods start from the cache and answer as the bare model does; the mirror is asked nothing more.
    pods = ready_pods("cached", ns, 2, timeout=240)
    for pod in pods:
        assert_reads_the_cache(pod)
        assert answer(pod) == bare_answer, pod["metadata"]["name"]
    assert mirror_requests(ns) == after_fill, "a pod asked the hub although the cache held the model"
    starts = sorted(start_figures(p, ns) for p in pods)
    for i, (total, load) in enumerate(starts, 1):
        report(f"model cache: pod {i} of 2 from the cache: container start -> serving {load:.1f}s "
               f"(pod created -> serving {total:.1f}s, with the wait for the fill)")

    # A replaced pod (deleted; the Deployment makes another) reads the same cache, no Job runs again.
    victim, kept = (p["metadata"]["name"] for p in pods)
    kubectl("delete", "pod", "-n", ns, victim, "--wait=false")
    t1 = time.monotonic()
    pods = ready_pods("cached", ns, 2, timeout=180, gone=victim)
    [new] = [p for p in pods if p["metadata"]["name"] != kept]
    assert_reads_the_cache(new)
    assert answer(new) == bare_answer
    assert mirror_requests(ns) == after_fill, "the replaced pod asked the hub"
    assert len(get_list("jobs", ns)) == 1
    total, load = start_figures(new, ns)
    report(f"model cache: a replaced pod from the cache: container start -> serving {load:.1f}s "
           f"(pod created -> serving {total:.1f}s; delete -> Ready {time.monotonic() - t1:.1f}s)")

    # The token is named, never shown: not in the resource, the Job, the pods or the logs.
    shown = json.dumps([get("csd", "cached", ns), job, pods]) + fill_log
    op = get_list("pods", RELEASE_NS, "app.kubernetes.io/name=chatstream-operator")[0]
    shown += kubectl("logs", "-n", RELEASE_NS, op["metadata"]["name"]).stdout
    assert TOKEN not in shown

    # For comparison: the same model without a cache, so its pod downloads it as it starts.
    t2 = time.monotonic()
    apply(resource("fresh", hub, replicas=1, cache=None), ns)
    [pod] = ready_pods("fresh", ns, 1, timeout=240)
    total, load = start_figures(pod, ns)
    report(f"model cache: a pod without the cache, downloading as it starts: container start -> serving {load:.1f}s "
           f"(pod created -> serving {total:.1f}s; kubectl apply -> Ready {time.monotonic() - t2:.1f}s)")
    assert answer(pod) == bare_answer
    assert weight_downloads(mirror_requests(ns)) == 2
    assert not get_list("persistentvolumeclaims", ns, "app.kubernetes.io/instance=fresh")
