"""The pure builders: a ChatStreamDeployment in, Deployment/Service/Secret out."""

from __future__ import annotations

from chatstream import envvars
from chatstream_operator import resources

from builder_helpers import make_resource


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def env(dep: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(dep)["env"]}


def test_defaults_give_a_runnable_cpu_deployment():
    dep = resources.deployment(make_resource())
    c = container(dep)
    assert dep["metadata"]["name"] == "chat" and dep["metadata"]["namespace"] == "team-a"
    assert dep["spec"]["replicas"] == 1
    assert c["image"] == resources.Images().cpu
    assert c["command"] == ["chatstream", "serve"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    e = env(dep)
    assert e[envvars.MODEL] == "builtin:smollm2-135m-instruct"
    assert e[envvars.PORT] == "8000"
    assert e[envvars.MAX_CONCURRENT] == "8" and e[envvars.MAX_QUEUE] == "32"  # the server's defaults
    assert e[envvars.MAX_NEW_TOKENS] == "256" and e[envvars.CONTEXT_LENGTH] == "2048"
    assert e[envvars.DEVICE] == "auto" and e[envvars.DTYPE] == "auto"
    assert e[envvars.SESSION_STORE] == "memory"
    assert e[envvars.CACHE_DIR] == resources.CACHE_DIR
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert c["resources"] == resources.DEFAULT_RESOURCES
    # No tracing section: no sampler override, no exporter.
    assert envvars.OTEL_EXPORTER_OTLP_ENDPOINT not in e and envvars.OTEL_TRACES_SAMPLER not in e
    assert e[envvars.OTEL_SERVICE_NAME] == "chat"
    # Spans name their pod (the kubelet expands $(POD_NAME) from the downward API).
    by_name = {x["name"]: x for x in c["env"]}
    assert by_name["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert e[envvars.OTEL_RESOURCE_ATTRIBUTES].startswith("k8s.pod.name=$(POD_NAME),")
    names = [x["name"] for x in c["env"]]
    assert names.index("POD_NAME") < names.index(envvars.OTEL_RESOURCE_ATTRIBUTES)  # $(VAR) needs it defined first


def test_the_model_threads_learn_the_pods_cpu_request_from_the_downward_api():
    # Without it a pod sizes its threads to the node's cores (threads.py): two pods on a 2-core node
    # ran 4 spinning threads and served 0.11x of one bare process.
    c = container(resources.deployment(make_resource()))
    [ref] = [x["valueFrom"]["resourceFieldRef"] for x in c["env"] if x["name"] == envvars.CPU_REQUEST]
    assert ref == {"containerName": c["name"], "resource": "requests.cpu", "divisor": "1m"}


def test_children_are_owned_by_the_resource_and_selected_by_its_labels():
    body = make_resource()
    for child in (resources.deployment(body), resources.service(body), resources.session_secret(body, "s")):
        [owner] = child["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "chatstream.io/v1alpha1", "kind": "ChatStreamDeployment", "name": "chat",
            "uid": "uid-1234", "controller": True, "blockOwnerDeletion": True,
        }
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "chatstream-operator"
    dep, svc = resources.deployment(body), resources.service(body)
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    assert resources.selector("chat") == "app.kubernetes.io/instance=chat,app.kubernetes.io/name=chatstream"


def test_builders_are_deterministic():
    assert resources.deployment(make_resource()) == resources.deployment(make_resource())
    assert resources.service(make_resource()) == resources.service(make_resource())


def test_replicas_follow_the_spec_without_rolling_pods():
    one = resources.deployment(make_resource({"model": {"source": "/models/x"}, "replicas": 1}))
    five = resources.deployment(make_resource({"model": {"source": "/models/x"}, "replicas": 5}))
    assert five["spec"]["replicas"] == 5
    assert one["spec"]["template"] == five["spec"]["template"]


def test_any_other_spec_change_changes_the_pod_template():
    base = resources.deployment(make_resource())
    changed = resources.deployment(make_resource({"model": {"source": "builtin:smollm2-135m-instruct"},
                                                  "generation": {"maxNewTokens": 100}}))
    key = resources.SPEC_HASH_ANNOTATION
    assert base["spec"]["template"]["metadata"]["annotations"][key] != changed["spec"]["template"]["metadata"]["annotations"][key]


def test_generation_is_recorded_for_status():
    dep = resources.deployment(make_resource(generation=7))
    assert dep["metadata"]["annotations"][resources.GENERATION_ANNOTATION] == "7"


def test_cuda_asks_for_one_gpu_and_tolerates_gpu_nodes():
    dep = resources.deployment(make_resource({"model": {"source": "hf:org/model", "device": "cuda"}}))
    c = container(dep)
    assert c["image"] == resources.Images().gpu
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in dep["spec"]["template"]["spec"]["tolerations"]


def test_gpu_count_from_requests_moves_to_limits():
    dep = resources.deployment(make_resource({
        "model": {"source": "hf:org/model"},
        "resources": {"requests": {"cpu": "4", "nvidia.com/gpu": 2}},
    }))
    assert container(dep)["resources"] == {"requests": {"cpu": "4"}, "limits": {"nvidia.com/gpu": 2}}


def test_explicit_image_policy_node_selector_and_tolerations_pass_through():
    dep = resources.deployment(make_resource({
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "image": "registry.example/chatstream:1.2", "imagePullPolicy": "Always",
        "nodeSelector": {"pool": "chat"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "chat", "effect": "NoSchedule"}],
    }), resources.Images(cpu="x", gpu="y"))
    pod = dep["spec"]["template"]["spec"]
    assert container(dep)["image"] == "registry.example/chatstream:1.2"
    assert container(dep)["imagePullPolicy"] == "Always"
    assert pod["nodeSelector"] == {"pool": "chat"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "chat", "effect": "NoSchedule"}]


def test_operator_default_images_apply_when_spec_names_none():
    images = resources.Images(cpu="reg/cpu:1", gpu="reg/gpu:1")
    assert container(resources.deployment(make_resource(), images))["image"] == "reg/cpu:1"


def test_user_env_replaces_generated_values_and_adds_new_ones():
    dep = resources.deployment(make_resource({
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "env": [{"name": envvars.MAX_QUEUE, "value": "3"}, {"name": "EXTRA", "value": "1"}],
    }))
    names = [e["name"] for e in container(dep)["env"]]
    assert names.count(envvars.MAX_QUEUE) == 1
    assert env(dep)[envvars.MAX_QUEUE] == "3" and env(dep)["EXTRA"] == "1"


def test_tracing_settings_become_standard_otel_variables():
    e = env(resources.deployment(make_resource({
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "tracing": {"otlpEndpoint": "http://collector:4318", "samplingRatio": 0.25},
    })))
    assert e[envvars.OTEL_EXPORTER_OTLP_ENDPOINT] == "http://collector:4318"
    assert e[envvars.OTEL_TRACES_SAMPLER] == "parentbased_traceidratio"
    assert e[envvars.OTEL_TRACES_SAMPLER_ARG] == "0.25"


def test_redis_sessions_read_the_url_from_the_secret_and_drop_client_pinning():
    body = make_resource({
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "sessions": {"store": "redis", "redisURLSecretRef": {"name": "redis-url"}},
    })
    e = env(resources.deployment(body))
    assert e[envvars.SESSION_STORE] == "redis"
    assert e[envvars.REDIS_URL] == {"secretKeyRef": {"name": "redis-url", "key": "url"}}
    assert resources.service(body)["spec"]["sessionAffinity"] == "None"
    assert resources.service(make_resource())["spec"]["sessionAffinity"] == "ClientIP"


def test_api_keys_come_from_the_secret_mounted_as_a_file():
    """A volume, not a variable: the kubelet updates a mounted Secret in place, so a rotated key reaches
    the server (which reads the file again) without a restart."""
    plain = resources.deployment(make_resource())
    assert envvars.API_KEYS_FILE not in env(plain)
    assert "api-keys" not in str(plain["spec"]["template"]["spec"]["volumes"])
    body = make_resource({"model": {"source": "builtin:smollm2-135m-instruct"},
                          "auth": {"apiKeysSecretRef": {"name": "chat-keys"}}})
    dep = resources.deployment(body)
    pod = dep["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "api-keys"]
    assert volume["secret"]["secretName"] == "chat-keys"
    [item] = volume["secret"]["items"]
    assert item["key"] == "keys"  # the CRD's default key
    [mount] = [m for m in container(dep)["volumeMounts"] if m["name"] == "api-keys"]
    assert mount["readOnly"] is True and "subPath" not in mount, "a subPath mount is never updated by the kubelet"
    assert env(dep)[envvars.API_KEYS_FILE] == f"{mount['mountPath']}/{item['path']}"
    assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == resources.UID
    assert not any(k in str(container(dep)["env"]) for k in ("chat-keys",)), "keys never travel as variables"
    other = make_resource({"model": {"source": "builtin:smollm2-135m-instruct"},
                           "auth": {"apiKeysSecretRef": {"name": "chat-keys", "key": "team-a"}}})
    assert "'key': 'team-a'" in str(resources.deployment(other)["spec"]["template"]["spec"]["volumes"])
    # Naming another Secret rolls the pods (through a rollout that cuts no stream); a key changed inside the
    # same Secret does not need to.
    assert resources.spec_hash(body["spec"]) != resources.spec_hash(make_resource()["spec"])


def test_all_pods_share_one_session_secret():
    body = make_resource()
    e = env(resources.deployment(body))
    assert e[envvars.SESSION_SECRET] == {"secretKeyRef": {"name": "chat-session", "key": "secret"}}
    secret = resources.session_secret(body, "s3cret")
    assert secret["metadata"]["name"] == "chat-session" and secret["stringData"] == {"secret": "s3cret"}
    assert secret["immutable"] is True


def names_and_values(manifests: list[dict]) -> dict:
    return {m["metadata"]["name"]: m["stringData"]["secret"] for m in manifests}


def test_a_new_resource_gets_one_fresh_value_in_both_session_secrets():
    made = resources.session_secrets_to_create(make_resource(), None, None, "fresh")
    assert names_and_values(made) == {"chat-session": "fresh", "chat-session-copy": "fresh"}
    assert all(m["immutable"] is True and m["metadata"]["ownerReferences"][0]["uid"] == "uid-1234" for m in made)


def test_a_deleted_session_secret_comes_back_with_the_value_the_pods_were_given():
    made = resources.session_secrets_to_create(make_resource(), None, "old", "fresh")
    assert names_and_values(made) == {"chat-session": "old"}


def test_a_deleted_copy_is_made_again_from_the_session_secret():
    """Also the upgrade path: resources made before the copy existed."""
    made = resources.session_secrets_to_create(make_resource(), "old", None, "fresh")
    assert names_and_values(made) == {"chat-session-copy": "old"}


def test_existing_session_secrets_are_never_rewritten():
    assert resources.session_secrets_to_create(make_resource(), "a", "b", "fresh") == []


def test_a_failing_container_leaves_its_message_for_status():
    """The kubelet keeps the termination message (or the end of the log
    when the file is empty) in the container status: status.py reads it."""
    pod = resources.deployment(make_resource())["spec"]["template"]["spec"]
    for c in pod["containers"] + pod["initContainers"]:
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert "terminationMessagePath" not in c  # the default, /dev/termination-log, is what the service writes


def test_children_and_pods_lead_back_to_their_resource():
    body = make_resource()
    for child in (resources.deployment(body), resources.service(body), resources.session_secret(body, "s")):
        assert resources.owner_of(child) == "chat"
    pod = {"kind": "Pod", "metadata": {"name": "chat-1", "labels": resources.labels("chat"),
                                      "ownerReferences": [{"kind": "ReplicaSet", "name": "chat-5d9", "controller": True}]}}
    assert resources.owner_of(pod) == "chat"
    stranger = {"kind": "Service", "metadata": {"name": "x", "labels": resources.labels("chat")}}
    assert resources.owner_of(stranger) is None
    other_crd = {"kind": "Deployment", "metadata": {"ownerReferences": [
        {"apiVersion": "example.com/v1", "kind": "ChatStreamDeployment", "name": "x", "controller": True}]}}
    assert resources.owner_of(other_crd) is None


def test_pods_are_locked_down_and_probed():
    dep = resources.deployment(make_resource())
    pod, c = dep["spec"]["template"]["spec"], container(dep)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[resources.CACHE_DIR]] and "emptyDir" in volumes[mounts["/tmp"]]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz", "the load budget is the startup probe's: it waits for the model"
    assert startup["periodSeconds"] * startup["failureThreshold"] == resources.STARTUP_BUDGET_SECONDS
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_termination_grace_outlasts_the_services_shutdown_grace():
    body = make_resource({"model": {"source": "builtin:smollm2-135m-instruct"}, "shutdownGraceSeconds": 120})
    dep = resources.deployment(body)
    assert env(dep)[envvars.SHUTDOWN_GRACE_SECONDS] == "120"
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 120 + resources.PRESTOP_SLEEP_SECONDS
    assert container(dep)["lifecycle"]["preStop"] == {"sleep": {"seconds": resources.PRESTOP_SLEEP_SECONDS}}


def test_hub_revision_is_passed_on():
    e = env(resources.deployment(make_resource({"model": {"source": "hf:org/model", "revision": "v2"}})))
    assert e[envvars.REVISION] == "v2"


def test_builtin_models_are_seeded_from_the_image_into_the_cache():
    dep = resources.deployment(make_resource())
    [init] = dep["spec"]["template"]["spec"]["initContainers"]
    assert init["image"] == container(dep)["image"]
    assert resources.BAKED_MODELS_DIR in init["command"][-1] and resources.CACHE_DIR in init["command"][-1]
    assert init["volumeMounts"] == [{"name": "cache", "mountPath": resources.CACHE_DIR}]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    hub = resources.deployment(make_resource({"model": {"source": "hf:org/model"}}))
    assert "initContainers" not in hub["spec"]["template"]["spec"]


def test_the_conversation_window_share_reaches_the_pod():
    assert env(resources.deployment(make_resource()))[envvars.WINDOW_KEEP] == "0.25"  # the CRD's default
    spec = {"model": {"source": "builtin:smollm2-135m-instruct"}, "generation": {"windowKeep": 1}}
    assert env(resources.deployment(make_resource(spec)))[envvars.WINDOW_KEEP] == "1"
    body = make_resource()
    del body["spec"]["generation"]["windowKeep"]  # a spec built by hand: the server's own default applies
    assert envvars.WINDOW_KEEP not in env(resources.deployment(body))
