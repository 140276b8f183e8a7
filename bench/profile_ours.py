"""Where does our server's time go under load? Samples it with py-spy while clients run.

    .venv/bin/python bench/profile_ours.py [--clients 16] [--seconds 20]

Starts `chatstream serve` as the benchmark does, drives it with closed-loop clients,
records it with py-spy (installed into bench/.peers/tools on first use) and prints the
share of samples per thread and per part of the engine step. The raw collapsed stacks
go to bench/.peers/logs/ours-profile.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import threading
from pathlib import Path

from lib.client import PROTOCOLS, run_level
from lib.environment import model_dir
from lib.servers import LOGS, PEERS, PEERS_DIR, Server

PY_SPY = PEERS_DIR / "tools" / "bin" / "py-spy"

# (bucket, substrings of a frame: the first bucket any frame of a stack matches wins, innermost first)
BUCKETS = [
    ("attention: sdpa kernel", ["scaled_dot_product_attention", "sdpa_attention_forward"]),
    ("attention: repeat_kv / mask prep", ["repeat_kv", "_preprocess_mask", "create_causal_mask", "_prepare_4d"]),
    ("kv cache update (SlotKVCache.update)", ["kv_cache.py"]),
    ("linear layers (q/k/v/o, mlp, lm_head)", ["linear (torch", "Linear.forward", "forward (torch/nn/modules/linear",
                                               "cpu_linear.py"]),
    ("rotary embedding", ["rotary", "apply_rotary_pos_emb"]),
    ("rms norm", ["RMSNorm", "rms_norm"]),
    ("activation (silu/mul)", ["silu", "act_fn"]),
    ("sampling", ["sampling.py"]),
    ("detokenize / stop strings", ["detokenize.py"]),
    ("engine step bookkeeping (loop.py)", ["loop.py"]),
    ("HTTP / asyncio / streaming", ["uvicorn", "starlette", "asyncio", "h11", "stream.py", "run.py", "openai_api"]),
]


def bucket(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, keys in BUCKETS:
            if any(k in frame for k in keys):
                return name
    return "other: " + (stack[-1][:80] if stack else "?")


def summarize(path: Path, top: int = 12) -> str:
    by_thread: collections.Counter = collections.Counter()
    by_bucket: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack_s, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        stack = stack_s.split(";")
        total += n
        by_thread[stack[0][:60]] += n
        if any("loop.py" in f for f in stack):
            by_bucket[bucket(stack)] += n
        leaf[stack[-1][:100]] += n
    if not total:
        return "no samples"
    engine = sum(by_bucket.values())
    out = [f"{total} samples (active, all threads)"]
    out += ["", "by thread:"] + [f"  {100 * v / total:5.1f}%  {k}" for k, v in by_thread.most_common(6)]
    out += ["", f"engine thread, by part of the step ({100 * engine / total:.1f}% of all samples):"]
    out += [f"  {100 * v / max(1, engine):5.1f}%  {k}" for k, v in by_bucket.most_common(top)]
    out += ["", "hottest frames (self):"] + [f"  {100 * v / total:5.1f}%  {k}" for k, v in leaf.most_common(top)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    if not PY_SPY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_DIR / "tools")], check=True)
        subprocess.run([str(PEERS_DIR / "tools" / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    model = model_dir(args.model)
    server = Server(PEERS["ours"], model, args.clients, args.new_tokens)
    server.start()
    out = LOGS / "ours-profile.txt"
    try:
        def record():
            subprocess.run([str(PY_SPY), "record", "--pid", str(server.proc.pid), "--duration",
                            str(int(args.seconds)), "--rate", "200", "--nonblocking", "--threads", "--format",
                            "raw", "--output", str(out)], check=False, capture_output=True)
        proto = PROTOCOLS["openai"]
        spy = threading.Timer(8.0, record)   # start once the clients are warm
        spy.start()
        run = asyncio.run(run_level(proto, server.base, "", args.clients, args.new_tokens, duration=args.seconds,
                                    warmup=8.0, warmup_cap=8.0, tail_cap=0.0, drain_cap=60.0))
        spy.join()
        done = [r for r in run.records if r.ok]
        print(f"{len(done)} requests done; profile in {out}\n")
        print(summarize(out))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
