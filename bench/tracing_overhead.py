"""What tracing costs a single stream: the same server with spans recorded vs sampled away.

Two `chatstream serve` processes run side by side, one with the default sampler
(every span recorded and kept in memory for /traces) and one with
OTEL_TRACES_SAMPLER=always_off. Requests alternate between them one at a time,
so both see the same machine state; the ratio of their mean latencies is the
overhead. Usage: .venv/bin/python bench/tracing_overhead.py [--requests 20] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import httpx

from lib.host import free_port

PROMPT = "Write a long story about a dragon."


def start(env_extra: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "CHATSTREAM_PORT": str(port), **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "chatstream", "serve", "--temperature", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


def one(url: str, new_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    ttft = None
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": new_tokens, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if ttft is None and line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                ttft = time.perf_counter() - t0
    return time.perf_counter() - t0, ttft or 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    servers = {"traced": start({}), "untraced": start({"OTEL_TRACES_SAMPLER": "always_off"})}
    try:
        for _, url in servers.values():
            one(url, 8)  # warm-up
        results = {name: [] for name in servers}
        for i in range(args.requests):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                results[name].append(one(servers[name][1], args.new_tokens))
        print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
        print(f"{'':10} {'latency mean':>14} {'latency p50':>12} {'TTFT p50':>10}")
        for name, rows in results.items():
            lat = [r[0] for r in rows]
            print(f"{name:10} {statistics.mean(lat):13.3f}s {statistics.median(lat):11.3f}s "
                  f"{statistics.median(r[1] for r in rows):9.3f}s")
        for label, stat in (("median", statistics.median), ("mean", statistics.mean)):
            traced = stat(r[0] for r in results["traced"])
            untraced = stat(r[0] for r in results["untraced"])
            print(f"tracing overhead on single-stream latency ({label}): {100 * (traced / untraced - 1):+.1f}% "
                  f"(goal: under 5%)")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
