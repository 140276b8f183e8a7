"""The container images, run the way the operator runs them."""

from __future__ import annotations

import os
import shutil
import secrets
import subprocess
import tempfile

import httpx
import pytest
from image_helpers import ROOT
from support.net import free_port, wait_ready
from support.podman import have_podman, podman

from chatstream import envvars
from chatstream.engine import bf16_linear
from chatstream_operator import resources

pytestmark = [
    pytest.mark.images,
    pytest.mark.skipif(not have_podman(), reason="needs podman and runc: scripts/system-deps-cluster.sh images"),
]

# What the operator's securityContext asks of every container.
LOCKED_DOWN = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--user=10001:10001"]


def pod_env(port: int) -> tuple[list[str], dict]:
    """The service container's environment exactly as the operator builds it
    for the builtin model (secret references filled in, loopback only)."""
    body = {
        "metadata": {"name": "image-test", "namespace": "default", "uid": "u", "generation": 1},
        "spec": {
            "model": {"source": "builtin:smollm2-135m-instruct", "dtype": "auto", "device": "cpu"},
            "replicas": 1, "concurrency": {"maxConcurrentStreams": 2, "maxQueueSize": 4},
            "generation": {"maxNewTokens": 48, "contextLength": 1024},
            "sessions": {"store": "memory"}, "shutdownGraceSeconds": 5,
        },
    }
    dep = resources.deployment(body)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    env[envvars.SESSION_SECRET] = secrets.token_urlsafe(16)
    env[envvars.HOST], env[envvars.PORT] = "127.0.0.1", str(port)
    return [f"--env={k}={v}" for k, v in env.items()], dep


@pytest.fixture
def server(images, request):
    """The CPU image as a pod runs it: the seed-cache init container fills
    a writable cache volume, then the server starts on a read-only root.
    Parametrized indirectly, with more environment for the server."""
    port = free_port()
    env, dep = pod_env(port)
    env += [f"--env={k}={v}" for k, v in getattr(request, "param", {}).items()]
    cache = tempfile.mkdtemp(prefix="chatstream-cache-")
    os.chmod(cache, 0o777)
    volumes = [f"--volume={cache}:{resources.CACHE_DIR}", "--tmpfs=/tmp:rw,mode=1777"]
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    podman("run", "--rm", "--network=host", *LOCKED_DOWN, *volumes, images["service"], *init["command"])
    command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    name = f"chatstream-test-{port}"
    podman("run", "-d", "--rm", f"--name={name}", "--network=host", *LOCKED_DOWN, *volumes, *env,
           images["service"], *command, "--temperature", "0")
    url = f"http://127.0.0.1:{port}"
    try:
        def alive():
            assert podman("ps", "-q", "--filter", f"name={name}", check=False).stdout.strip(), "server container exited"
        try:
            wait_ready(url, 180, alive, interval=1)
        except AssertionError as err:  # it exited, or never became ready: its logs say why
            raise AssertionError(f"{err}:\n" + podman("logs", name, check=False).stderr) from None
        yield url, name, cache
    finally:
        podman("stop", "--time=5", name, check=False)
        # As root the files are ours to remove; rootless, the container's
        # user maps into our user namespace.
        if os.geteuid() == 0:
            shutil.rmtree(cache, ignore_errors=True)
        else:
            podman("unshare", "rm", "-rf", cache, check=False)


def test_service_image_streams_an_answer(server):
    url, _, cache = server
    chunks = []
    with httpx.stream("POST", f"{url}/chat_stream", json={"user_input": "What is the capital of France?"}, timeout=120) as r:
        assert r.status_code == 200
        for chunk in r.iter_text():
            chunks.append(chunk)
    answer = "".join(chunks)
    assert len(chunks) > 1, "the answer came in one piece, not streamed"
    assert "Paris" in answer, answer
    # The model came from the image, seeded into the cache (not converted again).
    assert os.path.isfile(os.path.join(cache, "models", "smollm2-135m-instruct", "model.safetensors"))


@pytest.mark.skipif(bf16_linear.cpu_multiplies_bf16() is not None, reason="this CPU has no native bfloat16 products")
@pytest.mark.parametrize("server", [{envvars.CPU_LINEAR: "bfloat16"}], indirect=True)
def test_service_image_serves_the_bfloat16_mode_with_its_compiled_kernels(server):
    # The image had no compiler, so a pod asking for the bfloat16 mode got PyTorch's operators for
    # attention and the row-wise steps (about twice a decode step's time) without a word on /metrics.
    # Now it compiles the kernels for its CPU as it starts, into its cache volume, on a read-only root.
    url, _, cache = server
    info = next(line for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
                if line.startswith("chatstream_engine_info{"))
    assert 'dtype="float32/bfloat16-linear"' in info and 'kernels="compiled"' in info, info
    assert [name for name in os.listdir(os.path.join(cache, "kernels")) if name.endswith(".so")]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "smollm2-135m-instruct", "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"], r.text


def test_service_runs_as_non_root_on_a_read_only_root(server):
    _, name, _ = server
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    denied = podman("exec", name, "touch", "/opt/chatstream/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    assert podman("exec", name, "touch", "/tmp/x").returncode == 0  # the writable scratch volume


def test_images_default_to_a_non_root_user(images):
    for image in images.values():
        user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
        assert user == "10001:10001", (image, user)
        out = podman("run", "--rm", "--network=host", "--read-only", image, "id", "-u").stdout.strip()
        assert out == "10001"


def test_operator_image_has_the_operator_without_torch(images):
    out = podman("run", "--rm", "--network=host", *LOCKED_DOWN, images["operator"], "chatstream-operator", "--help").stdout
    assert "--liveness" in out
    probe = podman("run", "--rm", "--network=host", *LOCKED_DOWN, images["operator"], "python", "-c",
                   "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('kopf') is not None)")
    assert probe.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("cpus", ["1", None])
def test_model_threads_follow_the_container_cpu_limit(images, cpus):
    # torch alone would size its pool by the host's cores; a CPU limit (a CFS quota, as Kubernetes sets it)
    # must cap the model's threads, and no limit must leave every schedulable core in use.
    limit = [f"--cpus={cpus}"] if cpus else []
    probe = ("import os, logging; logging.basicConfig(level=logging.INFO); from chatstream.threads import configure; "
             "print(configure().threads, len(os.sched_getaffinity(0)))")
    out = podman("run", "--rm", "--network=host", *LOCKED_DOWN, *limit, images["service"], "python", "-c", probe)
    threads, schedulable = map(int, out.stdout.split())
    assert threads == (1 if cpus else schedulable)
    assert ("CPU limit 1" if cpus else "no CPU limit or request") in out.stderr


def test_a_short_disk_prune_keeps_the_build_cache_of_the_images(images):
    # In CI the disk ran short after the node's images were imported: build-images.sh pruned every
    # untagged layer, the build stages' layers among them (torch's environment), and the next build in the
    # same `make test` ran pip again and failed (podman exit 125). Forced here: a prune of everything
    # untagged, then a build, in which every RUN step must be a cache hit, giving the same images.
    def image_ids() -> dict:
        return {image: podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip() for image in images.values()}

    ids = image_ids()
    script = str(ROOT / "scripts/build-images.sh")
    pruned = subprocess.run(["bash", script, "--no-lint"], env={**os.environ, "PRUNE_BELOW_GB": "1000000"},
                            check=True, capture_output=True, text=True, timeout=1800)
    assert "pruning every untagged layer" in pruned.stderr
    build = subprocess.run(["bash", script, "--no-lint"], check=True, capture_output=True, text=True, timeout=1800)
    lines = build.stdout.splitlines()
    runs = [i for i, line in enumerate(lines) if ": RUN " in line]
    assert len(runs) >= 4  # the operator's and the service's RUN steps at least
    rerun = [lines[i] for i in runs if i + 1 >= len(lines) or not lines[i + 1].startswith("--> Using cache")]
    assert rerun == []
    assert image_ids() == ids
