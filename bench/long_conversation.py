"""Long conversations: time to first token turn by turn, before and after the history outgrows the context.

    .venv/bin/python bench/long_conversation.py [--shapes 1x28,8x24] [--context-length 1024]
        [--new-tokens 64] [--user-tokens 60] [--at REV] [--env KEY=VALUE ...] [--out STEM]

For each shape (conversations x turns) a fresh `chatstream serve` (this checkout's service/, or
REV's with --at, checked out by compare_commits.checkout) with --context-length, greedy. Each
conversation is one /chat_stream session (its cookie; the server holds the history), and the
conversations take their turns in lockstep rounds: every one sends turn t, every answer ends, then
turn t+1. So /metrics read between rounds gives each turn's prompt tokens, cached tokens and output
tokens exactly, whichever commit serves. A user message is about --user-tokens tokens: a passage of
bench/data/quality_text.txt and a follow-up question (lib.conversations.question); answers run to
--new-tokens. Whether a conversation's whole history still fits the prompt budget (the context less
room for an answer, as ChatStream.prompt_budget) is counted here with the model's chat template
(chatstream.render.encode_chat, the server's own tokenization).

Prints, per turn: TTFT (median and max over the conversations), the server's prompt and cached
tokens, the hit rate and tok/s, and how many histories still fit; then the turns before the window
filled against those after (from each conversation's first turn that does not fit), the cost of one
window prefill (a fresh prompt of the whole budget, measured alone: max_tokens 1, median of 3), and
issue 26's done-when checks. Writes STEM.json and STEM.md (default bench/results/<date>-long-conversation-<label>).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shlex
import statistics
import sys
import time
from pathlib import Path

from lib.client import warm_up
from lib.conversations import Conversation, question
from lib.environment import machine, model_dir
from lib.host import BENCH, RESULTS, ROOT, loadavg, log, wait_for_quiet
from lib.results import parse_run_args, server_bench_parser, write_results
from lib.report import md_table, text_table
from lib.servers import OursAt, Server, checkout, read_metrics

sys.path.insert(0, str(ROOT / "service"))  # the project's own chat template rendering
from chatstream.render import encode_chat  # noqa: E402

PASSAGES = [s.strip() + "." for s in (BENCH / "data" / "quality_text.txt").read_text().replace("\n", " ").split(".")
            if len(s.split()) > 3]


def user_message(tokenizer, user: int, turn: int, target: int) -> str:
    """A passage of about ``target`` tokens (sentences from the user's own place in the text) and a question."""
    sentences, i = [], user * 7 + turn * 3
    while len(tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]) < target:
        sentences.append(PASSAGES[i % len(PASSAGES)])
        i += 1
    return f"Here is a passage I read: \"{' '.join(sentences)}\" {question(user, turn + 1)}"


def prompt_budget(context: int, new_tokens: int) -> int:
    return context - min(new_tokens, context // 2)


def counters(base: str) -> dict:
    m = read_metrics(base) or {}
    return {k: m.get(f"chatstream_{k}_total", 0.0) for k in ("prompt_tokens", "prompt_tokens_cached",
                                                             "completion_tokens")}


async def conversations(server: Server, tokenizer, users: int, turns: int, args) -> list[dict]:
    """Every conversation's turns in lockstep rounds; one row per round with its records and counters."""
    budget = prompt_budget(args.context_length, args.new_tokens)
    convs = [Conversation("chat_stream", server.base, "", u, args.new_tokens) for u in range(users)]
    history: list[list[dict]] = [[] for _ in range(users)]
    rounds = []
    try:
        for t in range(turns):
            texts = [user_message(tokenizer, u, t, args.user_tokens) for u in range(users)]
            full = [len(encode_chat(tokenizer, history[u] + [{"role": "user", "content": texts[u]}]))
                    for u in range(users)]
            before, t0 = counters(server.base), time.perf_counter()
            recs = await asyncio.gather(*(c.turn(t, texts[u]) for u, c in enumerate(convs)))
            wall = time.perf_counter() - t0
            after = counters(server.base)
            delta = {k: after[k] - before[k] for k in after}
            for u, rec in enumerate(recs):
                if rec.error:
                    raise RuntimeError(f"conversation {u} turn {t + 1}: {rec.error}\n{server.tail()}")
                history[u] += [{"role": "user", "content": texts[u]}, {"role": "assistant", "content": rec.text}]
            rounds.append({"turn": t + 1, "wall_s": wall, "ttft_ms": [r.ttft_ms for r in recs],
                           "history_tokens": full, "fits": [n <= budget for n in full], **delta})
            r = rounds[-1]
            log(f"    turn {t + 1:>2}: TTFT p50 {statistics.median(r['ttft_ms']):7.0f} ms, max "
                f"{max(r['ttft_ms']):7.0f} ms; prompt {r['prompt_tokens'] / users:6.0f} tok, cached "
                f"{r['prompt_tokens_cached'] / users:6.0f}; {r['completion_tokens'] / wall:5.1f} tok/s; "
                f"history {statistics.mean(full):6.0f} tok, {sum(r['fits'])}/{users} fit")
    finally:
        for c in convs:
            await c.close()
    return rounds


async def window_prefill_ms(server: Server, tokenizer, budget: int, tries: int = 3) -> list[float]:
    """TTFT of fresh prompts of the whole prompt budget (nothing cached but the template's first tokens)."""
    out = []
    for i in range(tries):
        words = f"Note {i} of {time.time_ns()}: " + " ".join(PASSAGES * 4)
        while len(encode_chat(tokenizer, [{"role": "user", "content": words}])) > budget:
            words = words[: int(len(words) * 0.97)]
        conv = Conversation("v1", server.base, "", 100 + i, 4)
        try:
            rec = await conv.turn(0, words + " Summarize.")
        finally:
            await conv.close()
        if rec.error:
            raise RuntimeError(f"window prefill: {rec.error}")
        out.append(rec.ttft_ms)
    return out


def phases(rounds: list[dict], users: int) -> dict:
    """Records before each conversation's first overflow against those from it on; rounds wholly on one side."""
    first = []
    for u in range(users):
        over = [r["turn"] for r in rounds if not r["fits"][u]]
        first.append(over[0] if over else None)
    out = {"first_overflow_turn": first}
    for name, pick in (("before", lambda f, t: f is None or t < f), ("after", lambda f, t: f is not None and t >= f)):
        ttft = [r["ttft_ms"][u] for r in rounds for u in range(users) if pick(first[u], r["turn"])]
        whole = [r for r in rounds if all(pick(first[u], r["turn"]) for u in range(users))]
        prompt = sum(r["prompt_tokens"] for r in whole)
        out[name] = {
            "turns": len(ttft), "ttft_p50_ms": statistics.median(ttft) if ttft else None,
            "ttft_max_ms": max(ttft) if ttft else None,
            "hit_rate": sum(r["prompt_tokens_cached"] for r in whole) / prompt if prompt else None,
            "tok_s": (sum(r["completion_tokens"] for r in whole) / sum(r["wall_s"] for r in whole)) if whole else None,
            "rounds": [r["turn"] for r in whole]}
    return out


def checks(ph: dict, prefill_ms: float) -> list[dict]:
    b, a = ph["before"], ph["after"]
    if a["ttft_p50_ms"] is None or b["ttft_p50_ms"] is None:
        return [{"check": "the window filled", "met": False, "detail": "no turn on one side of the overflow"}]
    ratio = a["ttft_p50_ms"] / b["ttft_p50_ms"]
    over = a["ttft_max_ms"] - b["ttft_max_ms"]
    return [{"check": "median TTFT after the window filled <= 1.5x before", "met": ratio <= 1.5,
             "detail": f"{a['ttft_p50_ms']:,.0f} vs {b['ttft_p50_ms']:,.0f} ms = {ratio:.2f}x"},
            {"check": "slowest turn after <= slowest before + one window prefill", "met": over <= prefill_ms,
             "detail": f"{a['ttft_max_ms']:,.0f} vs {b['ttft_max_ms']:,.0f} ms: {over:+,.0f} ms against "
                       f"{prefill_ms:,.0f} ms"}]


def _f(v, digits=0, pct=False):
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:,.{digits}f}"


def tables(result: dict) -> tuple[list, list]:
    users = result["users"]
    per_turn = [["turn", "TTFT p50 (ms)", "TTFT max (ms)", "prompt tok", "cached tok", "hit", "tok/s",
                 "history tok", "fit"]]
    for r in result["rounds"]:
        hit = r["prompt_tokens_cached"] / r["prompt_tokens"] if r["prompt_tokens"] else None
        per_turn.append([str(r["turn"]), _f(statistics.median(r["ttft_ms"])), _f(max(r["ttft_ms"])),
                         _f(r["prompt_tokens"] / users), _f(r["prompt_tokens_cached"] / users), _f(hit, pct=True),
                         _f(r["completion_tokens"] / r["wall_s"], 1), _f(statistics.mean(r["history_tokens"])),
                         f"{sum(r['fits'])}/{users}"])
    ph = result["phases"]
    summary = [["", "turns", "TTFT p50 (ms)", "TTFT max (ms)", "hit rate", "tok/s"]]
    for name in ("before", "after"):
        p = ph[name]
        summary.append([f"{name} the window filled", str(p["turns"]), _f(p["ttft_p50_ms"]), _f(p["ttft_max_ms"]),
                        _f(p["hit_rate"], pct=True), _f(p["tok_s"], 1)])
    return per_turn, summary


def main() -> int:
    ap = server_bench_parser(__doc__)
    ap.add_argument("--shapes", default="1x28,8x24", help="comma-separated CONVERSATIONSxTURNS")
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--user-tokens", type=int, default=60, help="tokens of passage in each user message")
    ap.add_argument("--prefix-cache-tokens", type=int,
                    help="the server's KV budget (default: conversations x context length, so that every "
                         "conversation's window can stay cached)")
    ap.add_argument("--at", help="serve this commit's service/ (default: this checkout's)")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (e.g. CHATSTREAM_WINDOW_KEEP=1)")
    ap.add_argument("--label", default=None, help="names the run in the report (default: the commit)")
    args = parse_run_args(ap, out="", quiet_load=1.0, quiet_wait=10.0,
                          quiet_load_help="before each shape, wait for a 1-minute load average below this (the "
                                          "shared machine's other work disturbs TTFT)")

    model_path = model_dir(args.model)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    info = machine()
    tree, rev = (checkout(args.at), args.at) if args.at else (ROOT, "this checkout")
    label = args.label or (args.at or info["git_commit"][:12])
    budget = prompt_budget(args.context_length, args.new_tokens)
    log(f"==> {info['cpu_model']}, {info['cores']} cores; serving {rev} ({tree}); context {args.context_length}, "
        f"prompt budget {budget}, {args.new_tokens} new tokens, greedy")
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "label": label, "served": rev,
              "command": command,
              "machine": {k: info[k] for k in ("cpu_model", "cpu_simd", "cores", "ram_gib", "kernel", "git_commit")},
              "config": {**vars(args), "prompt_budget": budget}, "results": {}}
    for shape in args.shapes.split(","):
        users, turns = (int(x) for x in shape.strip().split("x"))
        env = {"CHATSTREAM_CONTEXT_LENGTH": str(args.context_length), "CHATSTREAM_TRACES_KEEP": "1000",
               "CHATSTREAM_PREFIX_CACHE_TOKENS": str(args.prefix_cache_tokens or users * args.context_length),
               **dict(item.split("=", 1) for item in args.env)}
        peer = OursAt(rev, tree, env)
        server = Server(peer, model_path, users, args.new_tokens, log=log)
        server.log_path = server.log_path.with_name(f"long-conversation-{users}x{turns}.log")
        log(f"==> {users} conversation(s) x {turns} turns; server env {env}")
        quiet = wait_for_quiet(args.quiet_load, args.quiet_wait * 60)
        server.start()
        try:
            asyncio.run(warm_up(server, "", args.new_tokens))  # a few single-turn requests, as multiturn.py
            load = [loadavg()]
            t0 = time.perf_counter()
            rounds = asyncio.run(conversations(server, tokenizer, users, turns, args))
            wall = time.perf_counter() - t0
            prefill = asyncio.run(window_prefill_ms(server, tokenizer, budget))
            load.append(loadavg())
        finally:
            server.stop()
        ph = phases(rounds, users)
        result = {"users": users, "turns": turns, "wall_s": wall, "env": env, "quiet": quiet, "loadavg": load,
                  "rounds": rounds,
                  "phases": ph,
                  "window_prefill_ms": prefill, "checks": checks(ph, statistics.median(prefill))}
        report["results"][shape] = result
        per_turn, summary = tables(result)
        log("\n" + text_table(per_turn) + "\n\n" + text_table(summary, left=(0,)))
        log(f"one window prefill ({budget} tokens, alone): {', '.join(f'{v:,.0f}' for v in prefill)} ms; "
            f"load average before {load[0]} after {load[1]}")
        for c in result["checks"]:
            log(f"{'MET   ' if c['met'] else 'MISSED'} {shape}: {c['check']}: {c['detail']}")
    stem = Path(args.out) if args.out else RESULTS / f"{report['date']}-long-conversation-{label}"
    md = [f"# Long conversation, {label} ({rev})", "",
          f"- {info['cpu_model']} ({', '.join(info['cpu_simd'])}), {info['cores']} cores; commit "
          f"{info['git_commit'][:12]}; context {args.context_length} (prompt budget {budget}), {args.new_tokens} new "
          f"tokens, user messages of ~{args.user_tokens} passage tokens, greedy, /chat_stream sessions in lockstep",
          f"- AMX: {'yes' if any(f.startswith('amx') for f in info['cpu_simd']) else 'no'}; avx512_bf16: "
          f"{'yes' if 'avx512_bf16' in info['cpu_simd'] else 'no'}", f"- command: `{command}`", ""]
    for shape, result in report["results"].items():
        per_turn, summary = tables(result)
        md += [f"## {shape} (conversations x turns), server env {result['env']}", "", md_table(summary), "",
               f"One window prefill ({budget} tokens, alone): "
               f"{', '.join(f'{v:,.0f}' for v in result['window_prefill_ms'])} ms; load average before "
               f"{result['loadavg'][0]} after {result['loadavg'][1]}"
               f"{'' if result['quiet'] else ' (NOT a quiet machine: other work was running)'}", "",
               *[f"- {'MET' if c['met'] else 'MISSED'}: {c['check']}: {c['detail']}" for c in result["checks"]], "",
               md_table(per_turn), ""]
    log("wrote {} and {}".format(*write_results(stem, report, "\n".join(md))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
