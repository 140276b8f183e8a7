"""A benchmark run's report: the flags every server benchmark takes, the report's frame (dates,
machine, load, quiet or not) and its files, bench/results/<stem>.json and .md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from .environment import machine
from .host import RESULTS, loadavg, log, stop_servers_on_sigterm, wait_for_quiet


def server_bench_parser(doc: str) -> argparse.ArgumentParser:
    """The start of a benchmark that runs servers: SIGTERM (a timeout, a kill) unwinds like Ctrl-C, so the
    server under test is stopped too; its argument parser, described by the docstring's first line."""
    stop_servers_on_sigterm()
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def parse_run_args(ap: argparse.ArgumentParser, *, out: str, quick: str | None = None,
                   quick_defaults: dict | None = None, quiet_load: float = 0.7,
                   quiet_load_help: str = "wait for a 1-minute load average below this",
                   quiet_wait: float = 20.0) -> argparse.Namespace:
    """Adds the flags every server benchmark takes (--model, --quick where ``quick`` says what it does,
    --quiet-load, --quiet-wait, --out) and parses. With --quick, each flag of ``quick_defaults`` left at its
    default takes the value given there, and the run does not wait for a quiet machine."""
    ap.add_argument("--model", help="model directory (default: `chatstream prepare-model`)")
    if quick:
        ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--quiet-load", type=float, default=quiet_load, help=quiet_load_help)
    ap.add_argument("--quiet-wait", type=float, default=quiet_wait, help="minutes to wait for it (0: do not wait)")
    ap.add_argument("--out", help=f"results file stem{f' (default {out})' if out else ''}")
    args = ap.parse_args()
    if quick and args.quick:
        for name, value in (quick_defaults or {}).items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
        args.quiet_wait = 0
    return args


def pick(spec: str, known, what: str) -> list[str]:
    """The comma-separated names in ``spec``; one not in ``known`` ends the run with the choices."""
    names = [k.strip() for k in spec.split(",") if k.strip()]
    for k in names:
        if k not in known:
            sys.exit(f"unknown {what} {k!r}; choose from {', '.join(known)}")
    return names


def _utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def start_report(args) -> tuple[dict, list[float]]:
    """Waits for a quiet machine (--quiet-load, --quiet-wait); the report's frame, with the machine, and
    the load average at the start. The caller adds "config" and fills "results" and "errors"."""
    info = machine()
    report = {"quiet": wait_for_quiet(args.quiet_load, args.quiet_wait * 60)}
    before = loadavg()
    log(f"==> {info['cpu_model']} ({', '.join(info['cpu_simd'])}), {info['cores']} cores, {info['ram_gib']} GiB; "
        f"load average {before}")
    now = _utc()
    report.update({"date": now.strftime("%Y-%m-%d"), "started_utc": now.isoformat(timespec="seconds"),
                   "machine": info, "config": {}, "results": {}, "errors": {}})
    return report, before


def attempt(report: dict, results: dict, key: str, measure, error_key: str | None = None) -> None:
    """``results[key] = measure()``; a failure is logged and kept in report["errors"][``error_key`` or
    ``key``], and the run goes on."""
    try:
        results[key] = measure()
    except Exception as exc:
        log(f"  FAILED: {exc}")
        report["errors"][error_key or key] = str(exc)[:2000]


def finish_report(report: dict, before: list[float], args, goals: list, render, kind: str = "") -> None:
    """Completes the report (the load average after; quiet: the wait succeeded and the start was below
    --quiet-load, since the servers under test load the machine themselves, only the start is judged; the
    goals), prints ``render(report)``'s text and writes the files: --out, else
    bench/results/<date>-<host kind><kind>[-quick]."""
    report["loadavg"] = {"before": before, "after": loadavg()}
    report["quiet"] = report.pop("quiet") and before[0] < args.quiet_load
    report["goals"] = goals
    report["finished_utc"] = _utc().isoformat(timespec="seconds")
    stem = Path(args.out) if args.out else RESULTS / (
        f"{report['date']}-{report['machine']['host_kind']}{kind}" + ("-quick" if args.quick else ""))
    text, md = render(report)
    log("\n" + text)
    log("\nwrote {} and {}".format(*write_results(stem, report, md)))


def write_results(stem: Path, data: dict, md: str, indent: int = 2) -> tuple[Path, Path]:
    """``stem``.json (``data``) and ``stem``.md (``md``), the folder made where missing."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(data, indent=indent) + "\n")
    md_path.write_text(md)
    return json_path, md_path
