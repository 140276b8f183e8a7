"""The model cache (model_cache.py): what the pods, the claim and the fill Job
look like, and what status says while the cache fills or when it cannot."""

from __future__ import annotations

import pytest

from chatstream_operator import model_cache, resources, status

from builder_helpers import make_resource

NOW = "2026-01-01T00:00:00Z"
HUB = {"source": "hf:acme/tiny-chat", "revision": "v1"}


def cached(cache=None, token=None, **spec) -> dict:
    model = {**HUB, "cache": cache or {"size": "5Gi"}}
    if token:
        model["tokenSecretRef"] = token
    return make_resource({"model": model, **spec})


def pod_spec(body: dict) -> dict:
    return resources.deployment(body)["spec"]["template"]["spec"]


def env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def job_of(body: dict) -> dict:
    return model_cache.fill_job(body, resources.deployment(body))


def test_pods_load_offline_from_the_claim_mounted_read_only():
    body = cached()
    pod = pod_spec(body)
    [c] = pod["containers"]
    e = env(c)
    assert e["HF_HUB_OFFLINE"] == "1" and e["HF_HUB_CACHE"] == model_cache.HUB_CACHE
    assert "HF_TOKEN" not in e, "pods that load from the cache never need the token"
    [volume] = [v for v in pod["volumes"] if v["name"] == model_cache.VOLUME]
    assert volume["persistentVolumeClaim"] == {"claimName": "chat-model-cache", "readOnly": True}
    [mount] = [m for m in c["volumeMounts"] if m["name"] == model_cache.VOLUME]
    assert mount == {"name": model_cache.VOLUME, "mountPath": model_cache.MOUNT, "readOnly": True}
    assert model_cache.HUB_CACHE.startswith(model_cache.MOUNT + "/")
    # The server's writable cache and HF_HOME stay on the emptyDir.
    assert e["HF_HOME"].startswith(resources.CACHE_DIR)


def test_pods_wait_for_the_ready_file_the_job_writes():
    body = cached()
    [wait] = pod_spec(body)["initContainers"]
    job = job_of(body)
    ready = job["spec"]["template"]["spec"]["containers"][0]["command"]
    ready = ready[ready.index("--ready-file") + 1]
    assert ready.startswith(model_cache.READY_DIR + "/") and f'[ -f "{ready}" ]' in wait["command"][-1]
    assert job["metadata"]["name"] in wait["command"][-1], "the wait says which Job it waits for"
    assert wait["volumeMounts"] == [{"name": model_cache.VOLUME, "mountPath": model_cache.MOUNT, "readOnly": True}]
    assert wait["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_ready_file_names_the_model_and_revision():
    files = {model_cache.ready_file(cached()["spec"])}
    for model in ({**HUB, "revision": "v2"}, {"source": "hf:acme/other", "revision": "v1"},
                  {"source": "hf:acme/tiny-chat"}, {"source": "hf:acme/tiny-chat", "revision": "refs/pr/1"}):
        name = model_cache.ready_file(make_resource({"model": {**model, "cache": {"size": "5Gi"}}})["spec"])
        assert "/" not in name.removeprefix(model_cache.READY_DIR + "/")
        files.add(name)
    assert len(files) == 5
    main = make_resource({"model": {"source": "hf:acme/tiny-chat", "revision": "main", "cache": {"size": "5Gi"}}})
    assert model_cache.ready_file(main["spec"]) in files, "no revision is main"


def test_the_fill_job_downloads_with_the_token_and_the_users_env():
    body = cached(token={"name": "hub"}, env=[{"name": "HF_ENDPOINT", "value": "http://mirror:8080"},
                                              {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}])
    dep = resources.deployment(body)
    job = model_cache.fill_job(body, dep)
    tpl = job["spec"]["template"]["spec"]
    [c] = tpl["containers"]
    assert c["command"][:4] == ["chatstream", "prepare-model", "--model", "hf:acme/tiny-chat"]
    assert c["command"][c["command"].index("--revision") + 1] == "v1"
    e = env(c)
    assert e["HF_TOKEN"] == {"secretKeyRef": {"name": "hub", "key": "token"}}
    assert e["HF_HUB_CACHE"] == model_cache.HUB_CACHE
    assert e["HF_ENDPOINT"] == "http://mirror:8080" and e["HTTPS_PROXY"] == "http://proxy:3128"
    assert "HF_HUB_OFFLINE" not in e
    assert {"name": model_cache.VOLUME, "mountPath": model_cache.MOUNT} in c["volumeMounts"]  # read-write
    assert tpl["volumes"][0] == {"name": model_cache.VOLUME, "persistentVolumeClaim": {"claimName": "chat-model-cache"}}
    # The model pods' image and security, no service account token, no restarts in place.
    model_pod = dep["spec"]["template"]["spec"]
    assert c["image"] == model_pod["containers"][0]["image"]
    assert c["securityContext"] == model_pod["containers"][0]["securityContext"]
    assert tpl["securityContext"]["runAsUser"] == model_pod["securityContext"]["runAsUser"]
    assert tpl["securityContext"]["fsGroup"] == model_pod["securityContext"]["fsGroup"]
    assert tpl["restartPolicy"] == "Never" and tpl["automountServiceAccountToken"] is False
    # A final error (no such repo, no access) ends the Job at once.
    [rule] = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert rule["onExitCodes"]["values"] == [model_cache.EXIT_FINAL]


def test_the_fill_job_is_owned_and_its_pods_are_not_the_services():
    body = cached()
    job = job_of(body)
    [owner] = job["metadata"]["ownerReferences"]
    assert owner["kind"] == "ChatStreamDeployment" and owner["name"] == "chat" and owner["controller"]
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == resources.MANAGER
    assert resources.owner_of(job) == "chat"
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    service_selector = resources.service(body)["spec"]["selector"]
    assert not service_selector.items() <= pod_labels.items(), "the Service would send chats to the fill pod"
    fill_pod = {"kind": "Pod", "metadata": {"labels": pod_labels}}
    assert resources.owner_of(fill_pod) is None and model_cache.owner_of(fill_pod) == "chat"
    assert len(job["metadata"]["name"]) <= 63  # it becomes a label value on its pods


def test_the_fill_job_follows_the_pods_onto_their_nodes():
    ours = {"kubernetes.io/hostname": "n1"}
    body = cached(nodeSelector=ours, tolerations=[{"key": "k", "operator": "Exists", "effect": "NoSchedule"}])
    tpl = job_of(body)["spec"]["template"]["spec"]
    assert tpl["nodeSelector"] == ours and tpl["tolerations"][0]["key"] == "k"
    gpu = make_resource({"model": {**HUB, "device": "cuda", "cache": {"size": "5Gi"}}})
    c = job_of(gpu)["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(c["resources"]), "the fill needs no GPU"


def test_one_job_per_model_revision_claim_and_token():
    name = model_cache.fill_job_name(cached())
    assert model_cache.fill_job_name(cached(env=[{"name": "X", "value": "1"}], replicas=3)) == name
    others = [
        make_resource({"model": {**HUB, "revision": "v2", "cache": {"size": "5Gi"}}}),
        cached(cache={"claimName": "shared-models"}),
        cached(token={"name": "hub"}),
        cached(token={"name": "hub", "key": "other"}),
    ]
    assert len({name} | {model_cache.fill_job_name(b) for b in others}) == 5
    long = make_resource({"model": {**HUB, "cache": {"size": "5Gi"}}}, name="x" * 200)
    assert len(model_cache.fill_job_name(long)) <= 63


def test_the_operator_makes_a_claim_only_when_given_a_size():
    body = cached(cache={"size": "20Gi", "storageClassName": "fast", "accessModes": ["ReadWriteMany"]})
    claim = model_cache.claim(body, resources.deployment(body))
    assert claim["metadata"]["name"] == "chat-model-cache"
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}},
                             "storageClassName": "fast"}
    assert claim["metadata"]["ownerReferences"][0]["name"] == "chat"
    plain = cached()
    assert model_cache.claim(plain, resources.deployment(plain))["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in model_cache.claim(plain, resources.deployment(plain))["spec"]
    # A claim of the user's: used as it is, never made.
    users = cached(cache={"claimName": "shared-models"})
    assert model_cache.claim(users, resources.deployment(users)) is None
    assert pod_spec(users)["volumes"][-1]["persistentVolumeClaim"]["claimName"] == "shared-models"


def test_without_a_cache_pods_download_with_the_token_and_nothing_else_changes():
    body = make_resource({"model": {**HUB, "tokenSecretRef": {"name": "hub", "key": "hf"}}})
    pod = pod_spec(body)
    e = env(pod["containers"][0])
    assert e["HF_TOKEN"] == {"secretKeyRef": {"name": "hub", "key": "hf"}}
    assert "HF_HUB_OFFLINE" not in e and "HF_HUB_CACHE" not in e
    assert "initContainers" not in pod and {v["name"] for v in pod["volumes"]} == {"cache", "tmp"}
    assert model_cache.fill_job(body, resources.deployment(body)) is None
    assert model_cache.claim(body, resources.deployment(body)) is None
    # spec.env wins over the generated variables, as everywhere.
    forced = cached(env=[{"name": "HF_HUB_OFFLINE", "value": "0"}])
    assert env(pod_spec(forced)["containers"][0])["HF_HUB_OFFLINE"] == "0"


# --- status ----------------------------------------------------------------

def job(conditions=(), name=None) -> dict:
    return {"metadata": {"name": name or model_cache.fill_job_name(cached())},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions]}}


def test_a_running_fill_says_filling_and_where_the_progress_is():
    pending_claim = {"status": {"phase": "Pending"}}
    st = model_cache.state(cached(), job(), pending_claim, None)
    assert st.condition["type"] == model_cache.CONDITION and st.condition["status"] == "False"
    assert st.condition["reason"] == "Filling" and st.failure is None
    assert "kubectl logs -f job/" in st.condition["message"] and "acme/tiny-chat@v1" in st.condition["message"]
    assert "claim chat-model-cache is Pending" in st.condition["message"]


def test_a_complete_fill_says_filled():
    st = model_cache.state(cached(), job([("Complete", None, "")]), {"status": {"phase": "Bound"}}, None)
    assert (st.condition["status"], st.condition["reason"], st.failure) == ("True", "Filled", None)


def test_a_failed_fill_is_degraded_with_the_pods_message():
    failed = job([("Failed", "PodFailurePolicy", "Container fill for pod x failed with exit code 2")])
    pod_says = ("Error", "pod chat-fill-x: error: cannot download hf:acme/tiny-chat@v1: RepositoryNotFoundError")
    st = model_cache.state(cached(), failed, None, pod_says)
    assert st.condition["reason"] == "FillFailed"
    reason, message = st.failure
    assert reason == "CacheFillFailed" and "RepositoryNotFoundError" in message
    assert f"kubectl delete job {failed['metadata']['name']}" in message, "the way out"
    # Without a pod (gone), the Job's own message.
    assert "exit code 2" in model_cache.state(cached(), failed, None, None).failure[1]


def test_a_fill_pod_that_cannot_run_is_degraded_while_the_job_waits():
    missing = ("CreateContainerConfigError", 'pod chat-fill-x: secret "hub" not found')
    st = model_cache.state(cached(token={"name": "hub"}), job(), None, missing)
    assert st.condition["reason"] == "Filling"
    assert st.failure == ("CreateContainerConfigError", 'model cache fill: pod chat-fill-x: secret "hub" not found')


def test_status_reports_the_cache_and_its_failure_first():
    body = cached()
    dep = resources.deployment(body)
    dep["status"] = {"observedGeneration": 1, "replicas": 1, "readyReplicas": 0, "updatedReplicas": 1,
                     "availableReplicas": 0}
    dep["metadata"]["generation"] = 1
    waiting = {"kind": "Pod", "metadata": {"name": "chat-a", "labels": resources.labels("chat")},
               "status": {"phase": "Pending", "initContainerStatuses": [
                   {"name": "wait-for-cache", "ready": False, "restartCount": 0, "state": {"running": {}}}]}}
    filling = model_cache.state(body, job(), None, None)
    st = status.compute(body, dep, [waiting], None, NOW, cache=filling)
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["ModelCached"]["reason"] == "Filling" and conds["Degraded"]["status"] == "False"
    assert conds["Ready"]["status"] == "False"
    failed = model_cache.state(body, job([("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]),
                               None, None)
    crashing = {**waiting, "status": {"phase": "Running", "containerStatuses": [
        {"name": "chatstream", "ready": False, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
         "lastState": {"terminated": {"exitCode": 3, "message": "model load failed"}}}]}}
    st = status.compute(body, dep, [crashing], None, NOW, cache=failed)
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "CacheFillFailed" and "backoff limit" in degraded["message"]
    # Not read this time (the reconcile failed before the Job): kept as it was.
    body["status"] = st
    st = status.compute(body, None, [], "the API refused a child", NOW)
    assert next(c for c in st["conditions"] if c["type"] == "ModelCached")["reason"] == "FillFailed"
    # The cache taken out of the spec: the condition goes.
    body["spec"]["model"].pop("cache")
    st = status.compute(body, dep, [], None, NOW)
    assert "ModelCached" not in {c["type"] for c in st["conditions"]}


@pytest.mark.parametrize("source", ["builtin:smollm2-135m-instruct", "/models/tiny"])
def test_no_cache_for_models_that_are_not_downloaded(source):
    # The CRD refuses cache for these; a spec built by hand gets none either.
    body = make_resource({"model": {"source": source}})
    body["spec"]["model"]["cache"] = {"size": "5Gi"}
    assert model_cache.cache_of(body["spec"]) is None
    assert model_cache.fill_job(body, resources.deployment(body)) is None
