"""A/B of this project's own server at two commits, on the same machine in the same run.

For refactors that must not cost speed: both commits' `chatstream serve` run one
at a time, alternating (A B A B ...) so that drift in the machine's speed hits
both alike, with the same closed-loop clients as bench/run.py, and the ratio of
output tokens/s (B over A) is printed per concurrency level.

    .venv/bin/python bench/compare_commits.py --base 1879004 --head HEAD --levels 1 16 --rounds 2

Each commit is checked out with `git worktree` under bench/.peers/ab/ and run
with this checkout's venv (PYTHONPATH points at the commit's service/).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

from lib.client import PROTOCOLS, run_level
from lib.host import cpuinfo
from lib.servers import OursAt, Server, checkout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD~1")
    p.add_argument("--head", default="HEAD")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--model", default=str(Path.home() / ".cache/chatstream/models/smollm2-135m-instruct"))
    p.add_argument("--env", action="append", default=["CHATSTREAM_PREFIX_CACHE_TOKENS=0"],
                   help="KEY=VALUE for both servers (default: the prefix cache off, since the single-turn prompts "
                        "repeat and a commit with the cache would skip their prefill)")
    args = p.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    peers = [OursAt(args.base, checkout(args.base), extra), OursAt(args.head, checkout(args.head), extra)]
    print(f"CPU: {cpuinfo()[0]} x{os.cpu_count()}; levels {args.levels}; {args.rounds} rounds of "
          f"{args.duration:.0f}s windows, alternating", flush=True)
    rates: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.rounds):
        for peer in peers if rnd % 2 == 0 else reversed(peers):
            server = Server(peer, args.model, max(args.levels), args.new_tokens)
            server.start()
            try:
                for level in args.levels:
                    run = asyncio.run(run_level(PROTOCOLS[peer.protocol], server.base, "", level, args.new_tokens,
                                                duration=args.duration, warmup=3, warmup_cap=60, tail_cap=60,
                                                drain_cap=30, log=print))
                    w0, w1 = run.window
                    # Each request's tokens, spread over its time, counted for the part inside the window.
                    tokens = sum((r.tokens or 0) * max(0.0, min(r.end, w1) - max(r.start, w0)) / (r.end - r.start)
                                 for r in run.records if r.ok and r.end > r.start)
                    rate = tokens / (w1 - w0)
                    rates.setdefault((peer.key, level), []).append(rate)
                    print(f"  round {rnd + 1} {peer.key:>16} {level:>3} clients: {rate:7.1f} tok/s", flush=True)
            finally:
                server.stop()
    print(f"\n| clients | {peers[0].key} tok/s | {peers[1].key} tok/s | ratio |\n| --- | --- | --- | --- |")
    for level in args.levels:
        a = statistics.mean(rates[(peers[0].key, level)])
        b = statistics.mean(rates[(peers[1].key, level)])
        print(f"| {level} | {a:.1f} | {b:.1f} | {b / a:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
