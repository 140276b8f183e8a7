"""What a results file records of the run's environment, and the model and peers it needs."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path

from .host import BENCH, SIMD_FLAGS, cpuinfo, log, sh
from .servers import PEERS, PROJECT_VENV


def machine() -> dict:
    cpu, flags = cpuinfo()
    with open("/proc/meminfo") as f:
        mem_kb = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
    cores = len(os.sched_getaffinity(0))
    kind = f"{cores}cpu-" + re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")
    simd = [f for f in SIMD_FLAGS if f in flags]
    versions = {}
    for key, peer in PEERS.items():
        if peer.python.exists():
            versions[key] = sh([str(peer.python), "-c",
                                "import json, torch, transformers; import importlib.metadata as m\n"
                                "v={'torch': torch.__version__, 'transformers': transformers.__version__,"
                                " 'torch_threads': torch.get_num_threads()}\n"
                                "for d in ('chatstream', 'chatstream-k8s', 'vllm', 'fastapi', 'uvicorn'):\n"
                                "    try: v[d] = m.version(d)\n"
                                "    except Exception: pass\n"
                                "print(json.dumps(v))"])
            try:
                versions[key] = json.loads(versions[key])
            except ValueError:
                pass
    return {
        "host_kind": kind, "hostname": socket.gethostname(), "cpu_model": cpu, "cpu_simd": simd,
        "cores": cores, "cpu_count": os.cpu_count(), "ram_gib": round(mem_kb / 1024 ** 2, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "lscpu": sh(["lscpu"]),
        "git_commit": sh(["git", "rev-parse", "HEAD"]),
        "git_dirty_service": bool(sh(["git", "status", "--porcelain", "--", "service"])),
        "versions": versions,
    }


def model_dir(arg: str | None) -> str:
    if arg:
        return str(Path(arg).resolve())
    out = sh([str(PROJECT_VENV / "bin" / "chatstream"), "prepare-model"], timeout=1800)
    path = out.splitlines()[-1].rpartition(" in ")[2].strip() if out else ""
    if not Path(path).is_dir():
        sys.exit(f"could not find the model directory from `chatstream prepare-model`: {out!r}")
    return path


def model_and_tokenizer(arg: str | None) -> tuple[str, object]:
    """``model_dir(arg)``, logged, and its tokenizer (this venv's transformers: it re-tokenizes the
    answers of servers that report no token count)."""
    path = model_dir(arg)
    log(f"==> model {path}")
    from transformers import AutoTokenizer
    return path, AutoTokenizer.from_pretrained(path)


def ensure_peers(keys: list[str]) -> None:
    peers = sorted({PEERS[k].python.parent.parent.name for k in keys if not k.startswith("ours")})
    missing = [k for k in peers if not (BENCH / ".peers" / k / "bin" / "python").exists()]
    stamp_ok = all((BENCH / ".peers" / k / ".bench-ready").exists() for k in peers)
    if missing or not stamp_ok:
        log("==> setting up peer environments (bench/setup_peers.sh)")
        subprocess.run(["bash", str(BENCH / "setup_peers.sh")] + peers, check=True)
