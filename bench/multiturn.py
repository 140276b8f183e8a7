"""Multi-turn benchmark: N users x T turns, side by side with vLLM CPU and `transformers serve`.

    .venv/bin/python bench/multiturn.py [--shapes 8x8,16x6] [--new-tokens 64]
        [--targets ours-v1,ours-chat_stream,vllm,vllm-2t,transformers] [--quick]

For every shape (users x turns) and every target, one server at a time: start it (a fresh
process, so no cache carries over from another shape or target), warm it up with a few
single-turn requests, read its /metrics, run the conversations (bench/lib/conversations.py),
read /metrics again, stop it. Reports, per target: TTFT p50/p99 at each turn index, output
tokens/s over the whole workload, the prompt-cache hit rate where the server exposes it
(tokens reused / prompt tokens, from its Prometheus counters), and ratios of ours (through
/v1/chat/completions and through /chat_stream sessions) against vLLM's best thread setting
and `transformers serve`. Writes bench/results/<date>-<host-kind>-multiturn[-quick].json/.md.
"""

from __future__ import annotations

import asyncio

from lib.client import warm
from lib.conversations import FOLLOW_UPS, OPENERS, question, run_workload
from lib.environment import ensure_peers, model_and_tokenizer
from lib.host import Sampler, loadavg, log
from lib.report import (fmt, fmt_ms, fmt_pct, fmt_ratio, goal_lines, md_table, percentile, ratio,
                        text_table)
from lib.results import attempt, finish_report, parse_run_args, pick, server_bench_parser, start_report
from lib.servers import (PEERS, CpuUse, RSSSampler, Server, note_start,
                         read_metrics)

VLLMS = ("vllm-2t-auto", "vllm", "vllm-2t")  # the first: vLLM as its users run it (bfloat16 on x86)
# target -> (server, API driven): ours through both of its APIs, the peers through /v1 only
OURS = {f"{server}-{api}": (server, api) for server in ("ours", "ours-bf16", "ours-int8", "ours-int8-bf16kv")
        for api in ("v1", "chat_stream")}
TARGETS = {**OURS, **{server: (server, "v1") for server in (*VLLMS, "transformers")}}
DEFAULT_TARGETS = ",".join(TARGETS)

# (tokens served from cache, prompt tokens): the first pair a server exposes is used.
# Ours: counters the engine's prefix cache adds beside chatstream_prompt_tokens (read when
# present). vLLM: vllm:prompt_tokens_cached / vllm:prompt_tokens (its local prefix cache).
HIT_COUNTERS = [
    ("chatstream_prompt_tokens_cached_total", "chatstream_prompt_tokens_total"),
    ("vllm:prompt_tokens_cached_total", "vllm:prompt_tokens_total"),
]
# also kept in the JSON: vLLM's prefix-cache lookups (tokens queried / tokens hit)
EXTRA_COUNTERS = ["vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                  "chatstream_completion_tokens_total", "vllm:generation_tokens_total"]
COMPLETION_COUNTERS = ["chatstream_completion_tokens_total", "vllm:generation_tokens_total"]


def counter_deltas(before: dict | None, after: dict | None) -> dict:
    if before is None or after is None:
        return {}
    names = [n for pair in HIT_COUNTERS for n in pair] + EXTRA_COUNTERS
    return {n: after[n] - before.get(n, 0.0) for n in names if n in after}


def hit_rate(deltas: dict) -> tuple[float | None, str]:
    for cached, prompt in HIT_COUNTERS:
        if cached in deltas and prompt in deltas and deltas[prompt] > 0:
            return deltas[cached] / deltas[prompt], f"{cached} / {prompt}"
    return None, "n/a: the server exposes no prompt-cache counter"


def workload_stats(run, deltas: dict) -> dict:
    ok = [r for r in run.records if r.ok]
    errors = [r.error for r in run.records if r.error]
    dur = run.end - run.t0
    # output tokens: what the server reported per answer; else its completion counter over
    # the workload; else the answers re-tokenized
    if ok and all(r.tokens is not None for r in ok):
        total, how = sum(r.tokens for r in ok), "usage.completion_tokens of each answer"
    elif any(n in deltas for n in COMPLETION_COUNTERS):
        n = next(n for n in COMPLETION_COUNTERS if n in deltas)
        total, how = deltas[n], f"the server's {n} over the workload"
    else:
        total, how = sum(r.tokens_retok or 0 for r in ok), "answers re-tokenized with the model's tokenizer"
    per_turn = []
    for t in range(run.turns):
        rs = [r for r in ok if r.turn == t]
        ttft = [r.ttft_ms for r in rs]
        pt = [r.prompt_tokens for r in rs if r.prompt_tokens is not None]
        ct = [r.cached_tokens for r in rs if r.cached_tokens is not None]
        per_turn.append({"turn": t + 1, "n": len(rs), "errors": sum(1 for r in run.records if r.turn == t and r.error),
                         "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
                         "ttft_max_ms": max(ttft) if ttft else None,
                         "prompt_tokens_mean": sum(pt) / len(pt) if pt else None,
                         "cached_tokens_mean": sum(ct) / len(ct) if ct else None})
    rate, rate_how = hit_rate(deltas)
    answers = [r.tokens if r.tokens is not None else r.tokens_retok for r in ok]
    answers = [a for a in answers if a is not None]
    return {
        "users": run.users, "turns": run.turns, "wall_s": round(dur, 2),
        "output_tokens": total, "output_tokens_how": how, "tok_s": total / dur if dur > 0 else None,
        "answers_ok": len(ok), "errors": len(errors), "error_samples": sorted(set(errors))[:5],
        "mean_tokens_per_answer": sum(answers) / len(answers) if answers else None,
        "hit_rate": rate, "hit_rate_how": rate_how, "counters": deltas, "per_turn": per_turn,
        "first_turn_prompt_tokens": per_turn[0]["prompt_tokens_mean"] if per_turn else None,
        "last_turn_prompt_tokens": per_turn[-1]["prompt_tokens_mean"] if per_turn else None,
        "client_cpu_s": round(run.cpu_s, 2),
    }


class CacheSampler(Sampler):
    """Polls ours' /metrics while the conversations run: the peak KV the prefix cache holds."""

    NAMES = ("chatstream_prefix_cache_tokens", "chatstream_prefix_cache_bytes")

    def __init__(self, base: str, every_s: float = 0.25):
        super().__init__(every_s)
        self.base, self.peak = base, dict.fromkeys(self.NAMES, 0.0)

    def sample(self) -> None:
        m = read_metrics(self.base) or {}
        for n in self.NAMES:
            self.peak[n] = max(self.peak[n], m.get(n, 0.0))


def count_tokens(tokenizer, records) -> None:
    todo = [r for r in records if r.text and r.tokens is None]
    if todo:
        ids = tokenizer([r.text for r in todo], add_special_tokens=False)["input_ids"]
        for r, i in zip(todo, ids):
            r.tokens_retok = len(i)


def bench_target(target: str, users: int, turns: int, args, model_path: str, tokenizer) -> dict:
    key, api = TARGETS[target]
    peer = PEERS[key]
    server = Server(peer, model_path, users, args.new_tokens, log=log)
    server.log_path = server.log_path.with_name(f"{target}-{users}x{turns}.log")
    out: dict = {"server": key, "api": api, "label": peer.label, "command": server.cmd, "notes": list(peer.notes)}
    server.start()
    try:
        note_start(server, out)
        model = peer.model_name(model_path)
        warm(server, model, args.new_tokens, log)
        before = read_metrics(server.base)
        la = loadavg()
        log(f"  {users} users x {turns} turns through {api}: load average {la[0]:.2f} ...")
        sampler = RSSSampler(server.proc.pid).start()
        sampler.mark("run")
        cpu = CpuUse(server.proc.pid).start()
        with CacheSampler(server.base) as cache:
            run = asyncio.run(run_workload(api, server.base, model, users, turns, args.new_tokens,
                                           think_s=args.think, log=log))
        cpu.stop()
        sampler.stop()
        after = read_metrics(server.base)
        count_tokens(tokenizer, run.records)
        s = workload_stats(run, counter_deltas(before, after))
        wall = max(1e-9, run.end - run.t0)
        s.update(loadavg_start=la, loadavg_end=loadavg(), peak_rss_mb=sampler.peaks.get("run"),
                 metrics_exposed=before is not None, **cpu.cores(run.cpu_s, wall))
        if key == "ours":
            s["prefix_cache_peak_tokens"] = cache.peak["chatstream_prefix_cache_tokens"]
            s["prefix_cache_peak_bytes"] = cache.peak["chatstream_prefix_cache_bytes"]
            s["prefix_cache_budget_tokens"] = args.prefix_cache_tokens
            log(f"     prefix cache peak: {s['prefix_cache_peak_tokens']:.0f} of {args.prefix_cache_tokens} tokens, "
                f"{s['prefix_cache_peak_bytes'] / 2**20:.1f} MiB")
        out.update(s)
        p = s["per_turn"]
        first50, last50, first99, last99 = (fmt_ms(p[i][f"ttft_{q}_ms"], ",.0f") for q in ("p50", "p99") for i in (0, -1))
        log(f"     {s['tok_s']:.1f} tok/s over {s['wall_s']:.1f}s, TTFT p50 turn 1 {first50} -> "
            f"turn {turns} {last50} (p99 {first99} -> {last99}), "
            f"hit rate {fmt_pct(s['hit_rate'])}, {s['answers_ok']} answers, {s['errors']} errors, "
            f"{fmt(s['mean_tokens_per_answer'])} tok/answer; CPU cores: server {s['server_cpu_cores']}, "
            f"client {s['client_cpu_cores']}, other {s['other_cpu_cores']}")
        out["records"] = [{"user": r.user, "turn": r.turn + 1, "ttft_ms": r.ttft_ms,
                           "total_ms": (r.end - r.start) * 1000, "tokens": r.tokens, "tokens_retok": r.tokens_retok,
                           "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens, "error": r.error,
                           "answer": r.text} for r in sorted(run.records, key=lambda r: (r.user, r.turn))]
    finally:
        server.stop()
    return out


def median_rounds(rounds: list[dict], targets: list[str]) -> dict:
    """Per target, its round with the median tok/s (the lower middle one of an even count), with every
    round's tok/s in ``rounds_tok_s``, in the order they ran."""
    out = {}
    for t in targets:
        runs = [r[t] for r in rounds if r.get(t, {}).get("tok_s") is not None]
        if runs:
            out[t] = dict(sorted(runs, key=lambda run: run["tok_s"])[(len(runs) - 1) // 2],
                          rounds_tok_s=[run["tok_s"] for run in runs])
    return out


def best_vllm(shape_results: dict) -> str | None:
    have = [k for k in VLLMS if shape_results.get(k, {}).get("tok_s") is not None]
    return max(have, key=lambda k: shape_results[k]["tok_s"]) if have else None


def goals(results: dict) -> list[dict]:
    """Issue 12's multi-turn goals, per shape and per API of ours."""
    out = []

    def add(name, ok, detail):
        out.append({"goal": name, "met": None if ok is None else bool(ok), "detail": detail})

    for shape, res in results.items():
        vk = best_vllm(res)
        v = res.get(vk) if vk else None
        for o in OURS:
            r = res.get(o)
            if not r or r.get("tok_s") is None:
                continue
            x = ratio(r["tok_s"], v and v["tok_s"])
            add(f"{shape} {o}: tok/s >= 2x vLLM's best thread setting", None if x is None else x >= 2.0,
                "n/a" if x is None else f"{r['tok_s']:.1f} vs {vk} {v['tok_s']:.1f} tok/s = {x:.2f}x")
            first, last = r["per_turn"][0]["ttft_p50_ms"], r["per_turn"][-1]["ttft_p50_ms"]
            x = ratio(last, first)
            add(f"{shape} {o}: TTFT p50 at the last turn <= 1.2x turn 1's", None if x is None else x <= 1.2,
                "n/a" if x is None else f"{last:,.0f} vs {first:,.0f} ms = {x:.2f}x")
            if r.get("prefix_cache_peak_tokens") is not None:
                peak, budget = r["prefix_cache_peak_tokens"], r["prefix_cache_budget_tokens"]
                add(f"{shape} {o}: cached KV inside its budget", peak <= budget,
                    f"peak {peak:.0f} of {budget} tokens ({r['prefix_cache_peak_bytes'] / 2**20:.1f} MiB)")
            mine = r["per_turn"][-1]["ttft_p99_ms"]
            theirs = v["per_turn"][-1]["ttft_p99_ms"] if v else None
            add(f"{shape} {o}: TTFT p99 at the last turn below vLLM's",
                None if mine is None or theirs is None else mine < theirs,
                "n/a" if mine is None or theirs is None else f"{mine:,.0f} vs {vk} {theirs:,.0f} ms")
    return out


def render(report: dict) -> tuple[str, str]:
    m, cfg = report["machine"], report["config"]
    head = [f"machine: {m['cpu_model']} ({', '.join(m['cpu_simd']) or 'no AVX2'}), {m['cores']} cores, "
            f"{m['ram_gib']} GiB RAM, kernel {m['kernel']}; commit {m['git_commit'][:12]}"
            f"{' (service/ modified)' if m['git_dirty_service'] else ''}",
            f"load average before {report['loadavg']['before']} after {report['loadavg']['after']}"
            f"{'  (NOT a quiet machine: other work was running)' if not report['quiet'] else ''}",
            f"workload: users x turns {', '.join(cfg['shapes'])}; {cfg['new_tokens']} new tokens max per answer, greedy, "
            f"float32; each user's own conversation, {len(OPENERS)} openers + {len(FOLLOW_UPS)} follow-ups; "
            f"think time {cfg['think_s']}s; /v1 sends the whole history, /chat_stream only the new input "
            "(session cookie)"]
    text, md = list(head), [f"# Multi-turn benchmark {report['date']} on {m['host_kind']}", "",
                            *[f"- {h}" for h in head], ""]
    for shape, res in report["results"].items():
        targets = [t for t in cfg["targets"] if t in res]
        vk = best_vllm(res)
        several = cfg.get("rounds", 1) > 1
        summary = [["target", "tok/s" + (" (median round)" if several else ""), "TTFT p50 turn 1 (ms)",
                    "TTFT p50 last (ms)", "TTFT p99 turn 1 (ms)",
                    "TTFT p99 last (ms)", "hit rate", "prompt tok turn 1 / last", "tok/answer", "errors",
                    "peak RSS (MiB)"] + (["tok/s of each round"] if several else [])]
        for t in targets:
            r = res[t]
            p = r["per_turn"]
            summary.append([t, fmt(r["tok_s"]), fmt(p[0]["ttft_p50_ms"], 0), fmt(p[-1]["ttft_p50_ms"], 0),
                            fmt(p[0]["ttft_p99_ms"], 0), fmt(p[-1]["ttft_p99_ms"], 0), fmt_pct(r["hit_rate"]),
                            f"{fmt(r['first_turn_prompt_tokens'], 0)} / {fmt(r['last_turn_prompt_tokens'], 0)}",
                            fmt(r["mean_tokens_per_answer"]), str(r["errors"]), fmt(r["peak_rss_mb"], 0)]
                           + ([" / ".join(fmt(x) for x in r.get("rounds_tok_s", []))] if several else []))
        ratios = [["ratio", "tok/s", "TTFT p50 last", "TTFT p99 last"]]
        for o in OURS:
            if o not in res:
                continue
            for peer in ([vk] if vk else []) + [p for p in ("transformers",) if p in res]:
                a, b = res[o], res[peer]
                ratios.append([f"{o} / {peer}{' (vLLM best)' if peer == vk else ''}",
                               fmt_ratio(ratio(a["tok_s"], b["tok_s"])),
                               fmt_ratio(ratio(a["per_turn"][-1]["ttft_p50_ms"], b["per_turn"][-1]["ttft_p50_ms"])),
                               fmt_ratio(ratio(a["per_turn"][-1]["ttft_p99_ms"], b["per_turn"][-1]["ttft_p99_ms"]))])
        per_turn = [["turn"] + [f"{t} p50 / p99 (ms)" for t in targets]]
        for i in range(len(res[targets[0]]["per_turn"]) if targets else 0):
            per_turn.append([str(i + 1)] + [f"{fmt(res[t]['per_turn'][i]['ttft_p50_ms'], 0)} / "
                                            f"{fmt(res[t]['per_turn'][i]['ttft_p99_ms'], 0)}" for t in targets])
        title = f"{shape} (users x turns)"
        text += ["", f"== {title}", text_table(summary, (0,)), "", text_table(ratios, (0,)) if len(ratios) > 1
                 else "(no ratios: ours or its peers missing)", "", "TTFT by turn", text_table(per_turn, ())]
        md += [f"## {title}", "", md_table(summary), ""]
        if len(ratios) > 1:
            md += ["Ratios ours/peer: tok/s higher is better, TTFT lower is better.", "", md_table(ratios), ""]
        md += ["TTFT by turn index:", "", md_table(per_turn), ""]
    g = goal_lines(report["goals"])
    text += ["", *g]
    md += ["## Goals", "", *[f"- {x}" for x in g], "", "## Servers", ""]
    for shape, res in report["results"].items():
        for t, r in res.items():
            md.append(f"- {shape} **{t}** ({r['label']}, {r['api']}): {'; '.join(r['notes'])}. "
                      f"Started in {r.get('startup_s')}s. Hit rate: {r['hit_rate_how']}. Tokens: {r['output_tokens_how']}.")
    if report.get("errors"):
        md += ["", "## Failures", ""] + [f"- {k}: {v}" for k, v in report["errors"].items()]
        text += ["", "FAILURES:"] + [f"  {k}: {v[:500]}" for k, v in report["errors"].items()]
    return "\n".join(text), "\n".join(md) + "\n"


def main() -> None:
    ap = server_bench_parser(__doc__)
    ap.add_argument("--shapes", default="8x8,16x6", help="comma-separated USERSxTURNS")
    ap.add_argument("--targets", default=DEFAULT_TARGETS, help=f"comma-separated, from {DEFAULT_TARGETS}")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefix-cache-tokens", type=int, default=4096,
                    help="ours' KV budget (--prefix-cache-tokens of chatstream serve; 4096 is its default)")
    ap.add_argument("--think", type=float, default=0.0, help="seconds a user waits between its turns")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of every target per shape, in turn (the order reversed every other round); each "
                         "target reports its median round: a shared machine's speed drifts by tens of percent "
                         "within minutes, and a ratio of two single runs minutes apart measures the drift too")
    args = parse_run_args(ap, out="bench/results/<date>-<host-kind>-multiturn[-quick]",
                          quick="smoke run: 2 users x 3 turns, no waiting for quiet", quick_defaults={"shapes": "2x3"})
    shapes = []
    for s in args.shapes.split(","):
        u, _, t = s.strip().partition("x")
        shapes.append((int(u), int(t)))
    targets = pick(args.targets, TARGETS, "target")

    for key in {server for server, _ in OURS.values()}:
        PEERS[key].prefix_cache_tokens = args.prefix_cache_tokens
    ensure_peers(sorted({TARGETS[t][0] for t in targets}))
    model_path, tokenizer = model_and_tokenizer(args.model)
    report, before = start_report(args)
    report["config"] = {"shapes": [f"{u}x{t}" for u, t in shapes], "targets": targets, "new_tokens": args.new_tokens,
                        "think_s": args.think, "quick": args.quick, "sampling": "greedy (temperature 0)",
                        "questions": {f"{u}x{t}": [[question(i, j) for j in range(t)] for i in range(u)]
                                      for u, t in shapes}}
    report["config"]["rounds"] = args.rounds
    for users, turns in shapes:
        shape = f"{users}x{turns}"
        rounds: list[dict] = []
        for r in range(args.rounds):
            rounds.append({})
            for t in (targets if r % 2 == 0 else targets[::-1]):
                log(f"==> {shape}{f' round {r + 1}' if args.rounds > 1 else ''}: {t} "
                    f"({PEERS[TARGETS[t][0]].label}, {TARGETS[t][1]})")
                attempt(report, rounds[-1], t, lambda: bench_target(t, users, turns, args, model_path, tokenizer),
                        f"{shape} {t}")
        report["results"][shape] = median_rounds(rounds, targets)
    finish_report(report, before, args, goals(report["results"]), render, "-multiturn")


if __name__ == "__main__":
    main()
