"""Benchmark: this project's server vs ChatStream 0.3.0 vs `transformers serve --continuous-batching` vs vLLM CPU.

    .venv/bin/python bench/run.py [--clients 1,8,16,32] [--new-tokens 64] [--duration 60]
                                  [--peers ours,ours-bf16,vllm-2t-auto,vllm-2t,...] [--quick]

Starts each server in turn (never two at once) on a loopback port with the same model
directory, warms it up, runs closed-loop streaming clients at each concurrency level,
stops it, then prints TTFT / inter-token latency / output tokens/s with ratios of ours
against each peer, the servers' resident memory, and the issue's goals. Writes
bench/results/<date>-<host-kind>.json and .md. Peer environments are made by
bench/setup_peers.sh (run automatically when missing).
"""

from __future__ import annotations

import asyncio
import time

from lib.client import PROMPTS, PROTOCOLS, count_tokens, run_level, warm
from lib.environment import ensure_peers, model_and_tokenizer
from lib.host import loadavg, log
from lib.report import (fmt_ms, goal_lines, goals, level_stats, md_table, memory_rows, results_table,
                        text_table)
from lib.results import attempt, finish_report, parse_run_args, pick, server_bench_parser, start_report
from lib.servers import PEERS, CpuUse, RSSSampler, Server, hwm_mb, note_start, rss_mb

# vllm-2t-auto first among the peers: vLLM as its users run it (--dtype auto, bfloat16 on x86)
DEFAULT_PEERS = "ours,ours-bf16,vllm-2t-auto,vllm-2t,ours-torch-linear,chatstream030,transformers,vllm"


def bench_peer(key: str, args, model_path: str, tokenizer) -> dict:
    peer = PEERS[key]
    levels = args.clients
    server = Server(peer, model_path, max(levels), args.new_tokens, log=log)
    out: dict = {"label": peer.label, "protocol": PROTOCOLS[peer.protocol].name, "command": server.cmd,
                 "notes": peer.notes, "levels": {}, "loadavg": {}}
    server.start()
    try:
        note_start(server, out)
        time.sleep(2)
        idle = rss_mb(server.proc.pid)
        model = peer.model_name(model_path)
        warm(server, model, args.new_tokens, log)
        time.sleep(2)
        idle_warm = rss_mb(server.proc.pid)
        sampler = RSSSampler(server.proc.pid).start()
        for i, c in enumerate(levels):
            last = i == len(levels) - 1   # the server stops next: no need to drain a long queue
            la = loadavg()
            log(f"  {c:>2} clients: load average {la[0]:.2f}; running {args.duration:.0f}s window ...")
            sampler.mark(str(c))
            cpu = CpuUse(server.proc.pid).start()
            run = asyncio.run(run_level(
                PROTOCOLS[peer.protocol], server.base, model, c, args.new_tokens, duration=args.duration,
                warmup=args.warmup, warmup_cap=args.warmup_cap, tail_cap=args.duration,
                drain_cap=5.0 if last else args.drain_cap, repeat_prompts=args.repeat_prompts, log=log))
            sampler.mark(None)
            cpu.stop()
            count_tokens(tokenizer, run.records)
            s = level_stats(run)
            s["loadavg_start"] = la
            s["loadavg_end"] = loadavg()
            s["peak_rss_mb"] = sampler.peaks.get(str(c))
            wall = run.end - run.t0
            s.update(cpu.cores(run.cpu_s, wall))
            # tokens per CPU-second the server used: less sensitive to other work on the machine
            s["tok_per_server_cpu_s"] = round(s["tok_s"] / max(1e-9, s["server_cpu_cores"]), 2)
            out["levels"][str(c)] = s
            log(f"     {s['tok_s']:.1f} tok/s, TTFT p50 {fmt_ms(s['ttft_p50_ms'])} p99 {fmt_ms(s['ttft_p99_ms'])}, "
                f"ITL p50 {fmt_ms(s['itl_p50_ms'])} p99 {fmt_ms(s['itl_p99_ms'])}, "
                f"{s['requests_measured']} requests measured, {s['errors']} errors, "
                f"{_n(s['mean_tokens_per_request'])} tok/request; CPU cores used: server "
                f"{s['server_cpu_cores']}, client {s['client_cpu_cores']}, other processes {s['other_cpu_cores']}; "
                f"{s['tok_per_server_cpu_s']} tok per server CPU-second")
            if s["errors"]:
                log(f"     errors: {s['error_samples']}")
        sampler.stop()
        peak = max(sampler.peaks.values()) if sampler.peaks else None
        out["memory"] = {"idle_mb": idle, "idle_warm_mb": idle_warm, "peak_load_mb": peak,
                         "peak_over_idle": peak / idle if peak and idle else None,
                         "peak_by_level_mb": sampler.peaks, "vm_hwm_mb": hwm_mb(server.proc.pid),
                         "how": "VmRSS of the server process and its children from /proc, sampled every 0.2s "
                                "during each level; idle = 2s after ready (before any request) and 2s after "
                                "warm-up; vm_hwm includes start-up (model loading) peaks"}
    finally:
        server.stop()
    return out


def _n(v):
    return "n/a" if v is None else f"{v:.1f}"


def render(report: dict) -> tuple[str, str]:
    peers, levels = report["config"]["peers"], report["config"]["clients"]
    labels = {k: k for k in peers}
    rows = results_table(report["results"], peers, levels, labels)
    mem = memory_rows(report["results"], peers, labels)
    g = goal_lines(report["goals"])
    load = [["server", "clients", "load avg at start", "CPU cores: server", "client", "other processes"]]
    for k in peers:
        for c, s in report["results"].get(k, {}).get("levels", {}).items():
            load.append([k, c, f"{s['loadavg_start'][0]:.2f}", f"{s['server_cpu_cores']:.2f}",
                         f"{s['client_cpu_cores']:.2f}", f"{s['other_cpu_cores']:.2f}"])
    m = report["machine"]
    la = report["loadavg"]
    head = (f"machine: {m['cpu_model']} ({', '.join(m['cpu_simd']) or 'no AVX2'}), {m['cores']} cores, "
            f"{m['ram_gib']} GiB RAM, kernel {m['kernel']}; "
            f"commit {m['git_commit'][:12]}{' (service/ modified)' if m['git_dirty_service'] else ''}\n"
            f"load average before {la['before']} after {la['after']}"
            f"{'  (NOT a quiet machine: other work was running)' if not report['quiet'] else ''}")
    cfg = report["config"]
    conf = (f"{cfg['new_tokens']} new tokens max, greedy, {cfg.get('dtype', 'float32')}, "
            f"{len(PROMPTS)} long-answer prompts, "
            f"{cfg['duration']:.0f}s window per level (after warm-up)")
    text = "\n".join([head, conf, "", text_table(rows), "", "ratios: ours/peer; for tok/s higher is better, "
                      "for TTFT/ITL lower is better", "", text_table(mem), "", text_table(load), "", *g])
    md = [f"# Benchmark {report['date']} on {m['host_kind']}", "",
          f"- machine: {m['cpu_model']} ({', '.join(m['cpu_simd']) or 'no AVX2'}), {m['cores']} cores, "
          f"{m['ram_gib']} GiB RAM, kernel {m['kernel']}, Python {m['python']}",
          "- versions: " + "; ".join(f"{k}: " + ", ".join(f"{a} {b}" for a, b in v.items())
                                      for k, v in m["versions"].items() if isinstance(v, dict)),
          f"- commit {m['git_commit']}{' (service/ modified)' if m['git_dirty_service'] else ''}",
          f"- load average (1, 5, 15 min) before {la['before']}, after {la['after']}"
          f"{' — **not a quiet machine**: other work was running' if not report['quiet'] else ''}",
          f"- workload: {conf}; closed-loop clients, each request a fresh single-turn conversation",
          "", "## Results", "", md_table(rows), "",
          "Ratios are ours/peer: for tok/s higher is better, for TTFT and ITL lower is better. "
          "`n` is the number of requests measured (in flight during the window and finished before the load was lowered); `tok/req` the mean output tokens "
          "per request. ChatStream 0.3.0 reports no token count: its answers are re-tokenized with the model's "
          "tokenizer, which counts 64.4 for the others' 64-token answers too (+0.6%, in its favour).", "", "## Memory", "", md_table(mem), "",
          "## Machine load during each level", "",
          "CPU cores used on average over the level (2 cores in all): by the server, by the benchmark client, "
          "and by every other process on the machine (from /proc/stat).", "", md_table(load), "", "## Goals", "",
          *[f"- {l}" for l in g], "", "## Servers", ""]
    for k in peers:
        r = report["results"].get(k)
        if r:
            md.append(f"- **{k}** ({r['label']}): {'; '.join(r['notes'])}. Started in {r.get('startup_s')}s.")
    if report.get("errors"):
        md += ["", "## Failures", ""] + [f"- {k}: {v}" for k, v in report["errors"].items()]
    return text, "\n".join(md) + "\n"


def main() -> None:
    ap = server_bench_parser(__doc__)
    ap.add_argument("--clients", default="1,8,16,32", help="comma-separated concurrency levels")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="measurement window per level, seconds")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="minimum warm-up per level; it lasts until every client has finished a request")
    ap.add_argument("--warmup-cap", type=float, default=40.0)
    ap.add_argument("--drain-cap", type=float, default=240.0)
    ap.add_argument("--peers", default=DEFAULT_PEERS)
    ap.add_argument("--repeat-prompts", action="store_true",
                    help="send the 8 prompts as they are (a prefix cache then skips their prefill); "
                         "by default each request's prompt starts with its own tag")
    ap.add_argument("--transformers-cb", choices=("tuned", "default"), default="tuned",
                    help="transformers serve KV-cache sizing: tuned for this workload (default) or its own")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights/activations dtype, the same for every server")
    args = parse_run_args(ap, out="bench/results/<date>-<host-kind>[-quick]",
                          quick="short run for development: 1,8 clients, 10s windows",
                          quick_defaults={"clients": "1,8", "duration": 10.0})
    if args.quick:
        args.warmup_cap = min(args.warmup_cap, 15.0)
        args.drain_cap = min(args.drain_cap, 60.0)
    args.clients = [int(c) for c in args.clients.split(",")]
    PEERS["transformers"].cb_defaults = args.transformers_cb == "default"
    for peer in PEERS.values():
        if not peer.own_dtype:
            peer.dtype = args.dtype
    keys = pick(args.peers, PEERS, "peer")

    ensure_peers(keys)
    model_path, tokenizer = model_and_tokenizer(args.model)  # re-tokenizes ChatStream 0.3.0's answers

    report, before = start_report(args)
    report["config"] = {"peers": keys, "clients": args.clients, "new_tokens": args.new_tokens,
                        "duration": args.duration, "warmup": args.warmup, "warmup_cap": args.warmup_cap,
                        "quick": args.quick, "transformers_cb": args.transformers_cb, "dtype": args.dtype,
                        "prompts": PROMPTS, "sampling": "greedy (temperature 0)"}
    for k in keys:
        log(f"==> {PEERS[k].label}")
        attempt(report, report["results"], k, lambda: bench_peer(k, args, model_path, tokenizer))
    # the CPU other processes took during each level is recorded per level (other_cpu_cores)
    finish_report(report, before, args, goals(report["results"]), render)


if __name__ == "__main__":
    main()
