"""Statistics, goal checks and the text/Markdown tables of a benchmark run."""

from __future__ import annotations

import math

from .client import LevelRun, Record

# (metric key, heading, unit, higher is better)
METRICS = [
    ("tok_s", "output tok/s", "", True),
    ("ttft_p50_ms", "TTFT p50", "ms", False),
    ("ttft_p99_ms", "TTFT p99", "ms", False),
    ("itl_p50_ms", "ITL p50", "ms", False),
    ("itl_p99_ms", "ITL p99", "ms", False),
]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _tokens(r: Record) -> int | None:
    return r.tokens if r.tokens is not None else r.tokens_retok


def level_stats(run: LevelRun) -> dict:
    w0, w1 = run.window
    ok = [r for r in run.records if r.ok]
    # Throughput: each request's tokens are spread over its content events; events that
    # arrived inside the window count. For SSE peers one event is one token.
    window_tokens = 0.0
    for r in ok:
        n = _tokens(r)
        if n and r.events:
            per = n / len(r.events)
            window_tokens += per * sum(1 for t in r.events if w0 <= t <= w1)
    # Latency: the requests in flight during the window that finished while the load was
    # still kept up (not during the drain, when fewer clients remain).
    measured = [r for r in ok if r.start < w1 and r.end > w0 and r.end <= run.tail_end]
    unfinished = sum(1 for r in ok if r.start < w1 and r.end > run.tail_end)
    ttft = [(r.first - r.start) * 1000 for r in measured]
    itl = [(b - a) * 1000 for r in measured for a, b in zip(r.events, r.events[1:])]
    tpot = [(r.events[-1] - r.first) * 1000 / (_tokens(r) - 1) for r in measured
            if _tokens(r) and _tokens(r) > 1]
    toks = [_tokens(r) for r in measured if _tokens(r) is not None]
    retok = [r.tokens_retok for r in measured if r.tokens_retok is not None]
    errors = [r.error for r in run.records if r.error]
    dur = w1 - w0
    return {
        "clients": run.clients,
        "window_s": round(dur, 2),
        "tok_s": window_tokens / dur if dur > 0 else None,
        "req_s": sum(1 for r in ok if w0 <= r.end <= w1) / dur if dur > 0 else None,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99),
        "tpot_mean_ms": sum(tpot) / len(tpot) if tpot else None,
        "requests_measured": len(measured), "requests_finished_after_tail": unfinished,
        "requests_total": len(run.records), "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "mean_tokens_per_request": sum(toks) / len(toks) if toks else None,
        "mean_tokens_retokenized": sum(retok) / len(retok) if retok else None,
        "finished_by_length": sum(1 for r in measured if r.finish == "length"),
        "client_cpu_s": round(run.cpu_s, 2),
        "level_wall_s": round(run.end - run.t0, 1),
    }


def ratio(ours: float | None, peer: float | None) -> float | None:
    if ours is None or peer is None or peer == 0:
        return None
    return ours / peer


def fmt(v, digits=1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def fmt_ratio(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_ms(v, spec: str = ".0f") -> str:
    return "n/a" if v is None else f"{v:{spec}}ms"


def fmt_pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def results_table(results: dict, peers: list[str], levels: list[int], labels: dict) -> list[list[str]]:
    """Rows: one per (level, peer); ratio columns ours/peer for each peer."""
    others = [p for p in peers if p != "ours"]
    head = ["clients", "server"] + [f"{h} ({u})" if u else h for _, h, u, _ in METRICS] + ["tok/req", "n"]
    rows = [head]
    for c in levels:
        for p in peers:
            s = results.get(p, {}).get("levels", {}).get(str(c))
            if s is None:
                continue
            rows.append([str(c), labels[p]] + [fmt(s[k], 1 if k == "tok_s" else 0) for k, *_ in METRICS]
                        + [fmt(s["mean_tokens_per_request"]), str(s["requests_measured"])])
        ours = results.get("ours", {}).get("levels", {}).get(str(c))
        for o in others:
            s = results.get(o, {}).get("levels", {}).get(str(c))
            if ours is None or s is None:
                continue
            rows.append([str(c), f"ratio ours/{o}"]
                        + [fmt_ratio(ratio(ours[k], s[k])) for k, *_ in METRICS] + ["", ""])
    return rows


def text_table(rows: list[list[str]], left: tuple[int, ...] = (1,)) -> str:
    """Columns right-aligned, except the (label) columns in ``left``."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def md_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def memory_rows(results: dict, peers: list[str], labels: dict) -> list[list[str]]:
    rows = [["server", "idle RSS before 1st request (MiB)", "idle RSS after warm-up (MiB)",
             "peak RSS under load (MiB)", "peak / idle before", "peak / idle after warm-up", "peak by clients (MiB)"]]
    for p in peers:
        m = results.get(p, {}).get("memory")
        if not m:
            continue
        by = ", ".join(f"{c}: {v:.0f}" for c, v in m["peak_by_level_mb"].items())
        warm = m["peak_load_mb"] / m["idle_warm_mb"] if m["peak_load_mb"] and m["idle_warm_mb"] else None
        rows.append([labels[p], fmt(m["idle_mb"], 0), fmt(m["idle_warm_mb"], 0), fmt(m["peak_load_mb"], 0),
                     fmt_ratio(m["peak_over_idle"]), fmt_ratio(warm), by])
    return rows


# servers that are peers (not ablations of ours) and the vLLM thread settings among them
# vllm-2t-auto: vLLM in its default dtype (bfloat16 on x86), the peer its users run (issue 24)
PEER_KEYS = ("chatstream030", "transformers", "vllm-2t-auto", "vllm", "vllm-2t")
VLLM_KEYS = ("vllm-2t-auto", "vllm", "vllm-2t")
OURS_KEYS = ("ours", "ours-bf16", "ours-int8")  # goals are judged for each; their lines say which


def best_of(results: dict, keys, c) -> tuple[str | None, dict | None]:
    """The key and level stats of the highest tok/s among ``keys`` at ``c`` clients."""
    have = [(k, results.get(k, {}).get("levels", {}).get(str(c))) for k in keys]
    have = [(k, s) for k, s in have if s and s.get("tok_s") is not None]
    return max(have, key=lambda x: x[1]["tok_s"]) if have else (None, None)


def goals(results: dict) -> list[dict]:
    """The issues' goals (issue 12 for vLLM), each with the numbers that decide it."""
    def lvl(p, c):
        return results.get(p, {}).get("levels", {}).get(str(c))

    out = []

    def add(name, value, target, ok, detail):
        out.append({"goal": name, "value": value, "target": target,
                    "met": None if ok is None else bool(ok), "detail": detail})

    for me in OURS_KEYS:
        if me != "ours" and me not in results:
            continue
        prefix = "" if me == "ours" else f"{me}: "

        def tok_ratio_goal(c, peer_name, peer_key, p, need):
            o = lvl(me, c)
            r = ratio(o and o["tok_s"], p and p["tok_s"])
            add(f"{prefix}tok/s at {c} clients >= {need:g}x {peer_name}", r, need, None if r is None else r >= need,
                "n/a" if r is None else f"{o['tok_s']:.1f} vs {peer_key} {p['tok_s']:.1f} tok/s = {r:.2f}x")

        for c in (8, 16, 32):
            key, best = best_of(results, VLLM_KEYS, c)
            tok_ratio_goal(c, "vLLM's best setting", key, best, 1.5)
            tok_ratio_goal(c, "transformers", "transformers", lvl("transformers", c), 2.0)
        for c in (16, 32):
            tok_ratio_goal(c, "ChatStream 0.3.0", "chatstream030", lvl("chatstream030", c), 5.0)
        key, best = best_of(results, PEER_KEYS, 1)
        tok_ratio_goal(1, "the best peer", key, best, 1.3)
        for c in (1, 8, 16, 32):
            o = lvl(me, c)
            peers = [(k, lvl(k, c)) for k in PEER_KEYS if lvl(k, c) and lvl(k, c).get("ttft_p99_ms") is not None]
            name = f"{prefix}TTFT p99 at {c} clients below every peer's"
            if o and o.get("ttft_p99_ms") is not None and peers:
                k, p = min(peers, key=lambda x: x[1]["ttft_p99_ms"])
                add(name, o["ttft_p99_ms"] / p["ttft_p99_ms"], 1.0, o["ttft_p99_ms"] < p["ttft_p99_ms"],
                    f"{o['ttft_p99_ms']:.0f} ms vs the lowest peer, {k}, {p['ttft_p99_ms']:.0f} ms")
            elif o:
                add(name, None, 1.0, None, "n/a")
    m = results.get("ours", {}).get("memory")
    for base, what in (("idle_warm_mb", "idle after warm-up"), ("idle_mb", "idle before its first request")):
        name = f"ours: peak RSS under load <= 1.5x RSS {what}"
        if m and m.get("peak_load_mb") and m.get(base):
            r = m["peak_load_mb"] / m[base]
            add(name, r, 1.5, r <= 1.5, f"{m['peak_load_mb']:.0f} MiB peak vs {m[base]:.0f} MiB = {r:.2f}x")
        else:
            add(name, None, 1.5, None, "n/a")
    return out


def goal_lines(gs: list[dict]) -> list[str]:
    mark = {True: "MET   ", False: "MISSED", None: "n/a   "}
    return [f"{mark[g['met']]} {g['goal']}: {g['detail']}" for g in gs]
