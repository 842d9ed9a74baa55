"""``python -m bench`` (or ``make bench``): run the benchmarks, print the figures and write
them to BENCHMARKS.md.

    python -m bench                  all six benchmarks (under 10 minutes on 2 cores)
    python -m bench --quick          a one-minute smoke run with small sizes (prints only)
    python -m bench --full           also a 10,000/100,000-order backfill for memory (long)
    python -m bench only backfill    one benchmark (or several); BENCHMARKS.md keeps the
                                     other sections from their last run
    python -m bench --profile DIR    also record a py-spy profile of the backfill's sync-all

Names: ceiling, backfill, idle, propagation, memory, startup.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, log, machine, workdir
from bench.suites import SUITES, Config, Section

RESULTS = ROOT / "bench" / "results.json"
ANALYSIS = ROOT / "bench" / "analysis.md"
OUTPUT = ROOT / "BENCHMARKS.md"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, about one minute; "
                   "prints only, BENCHMARKS.md is not touched")
    p.add_argument("--full", action="store_true", help="add the 100,000-order backfill")
    p.add_argument("--concurrency", type=int, default=4,
                   help="backfill: HMS_SYNC_CONCURRENCY and the limit's concurrency (default 4, "
                   "the fastest for both on a 2-core machine; see the sweep)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record a py-spy speedscope profile of the backfill's sync-all")
    p.add_argument("--orders", type=int, metavar="N",
                   help="backfill size (default 20,000; 1,000 with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, stores)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--render", action="store_true",
                   help="only rewrite BENCHMARKS.md from bench/results.json (no run)")
    p.add_argument("command", nargs="*", metavar="only NAME",
                   help="`only NAME [NAME...]` runs just those benchmarks")
    args = p.parse_args(argv)
    names = list(SUITES)
    if args.command:
        if args.command[0] != "only" or len(args.command) < 2:
            p.error("expected `only NAME [NAME...]`")
        unknown = [n for n in args.command[1:] if n not in SUITES]
        if unknown:
            p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(SUITES)}")
        names = args.command[1:]
    args.names = names
    return args


def render_text(sec: Section) -> str:
    lines = [f"== {sec.title}  ({sec.seconds:.0f} s)"]
    for f in sec.figures:
        verdict = "" if f.met is None else ("  [met]" if f.met else "  [NOT MET]")
        target = f"  (target {f.target})" if f.target else ""
        lines.append(f"   {f.name}: {f.value}{target}{verdict}")
    return "\n".join(lines)


def _met(m: bool | None) -> str:
    return "" if m is None else ("met" if m else "**not met**")


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "# hms-sync benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand — the analysis at "
        "the end comes from `bench/analysis.md`.",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} CPU(s): {m['cpu']}; {m['memory']} RAM",
        f"- Python {m['python']}, {m['platform']}",
        f"- run {m['date']} at commit `{m['commit']}`; load average at start: {m['load']}",
        f"- whole run: {results.get('total_seconds', 0):.0f} s "
        f"(`{('python -m bench ' + results.get('argv', '')).strip()}`)",
        "",
        "## Reproduce",
        "",
        "```",
        "make bench                      # python -m bench: all, < 10 min on 2 cores",
        "python -m bench --quick         # ~1 min smoke run with small sizes (prints only)",
        "python -m bench only backfill   # one benchmark; the other sections are kept",
        "python -m bench --full          # adds the 100,000-order backfill (long)",
        "python -m bench --profile DIR   # py-spy profile of the backfill's sync-all",
        "```",
        "",
        "Every figure comes from separate processes: the sandbox (`python -m hms_sync.sandbox`"
        ", a fresh one per benchmark), hms-sync (`hms-sync sync-all` / `hms-sync run`) and the "
        "bench's own load scripts (`python -m bench.load`).",
        "",
        "## Targets",
        "",
        "| benchmark | figure | value | target | |",
        "|---|---|---|---|---|",
    ]
    sections = results["sections"]
    order = [k for k in SUITES if k in sections]
    for key in order:
        s = sections[key]
        for f in s["figures"]:
            if f["target"]:
                out.append(f"| {key} | {f['name']} | {f['value']} | {f['target']} | "
                           f"{_met(f['met'])} |")
    for key in order:
        s = sections[key]
        out += ["", f"## {s['title']}", "",
                f"_{s['run']['date']}, commit `{s['run']['commit']}`, load at start "
                f"{s['run']['load']}, {s['seconds']:.0f} s"
                f"{', quick' if s['run'].get('quick') else ''}_",
                "", "| figure | value | target | |", "|---|---|---|---|"]
        for f in s["figures"]:
            out.append(f"| {f['name']} | {f['value']} | {f['target']} | {_met(f['met'])} |")
        for note in s["notes"]:
            out += ["", note]
    if ANALYSIS.exists():
        out += ["", ANALYSIS.read_text().strip()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.render:
        OUTPUT.write_text(render_markdown(json.loads(RESULTS.read_text())))
        return 0
    write = not (args.quick or args.no_write)
    started = time.perf_counter()
    info = machine()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    previous: dict[str, Any] = {}
    if write and RESULTS.exists() and args.names != list(SUITES):
        previous = json.loads(RESULTS.read_text())
    sections: dict[str, Any] = dict(previous.get("sections", {}))
    failures = 0
    with workdir(keep=args.keep) as wd:
        if args.keep:
            log(f"work directory: {wd}")
        cfg = Config(quick=args.quick, full=args.full, concurrency=args.concurrency,
                     profile_dir=args.profile, workdir=wd, backfill_orders=args.orders)
        for name in args.names:
            log(f"--- {name}")
            t0 = time.perf_counter()
            try:
                sec = SUITES[name](cfg)
            except Exception as exc:  # one failing benchmark must not hide the others
                failures += 1
                log(f"{name} FAILED: {type(exc).__name__}: {exc}")
                sec = Section(name, f"{name}: failed")
                sec.add("error", f"{type(exc).__name__}: {str(exc)[:300]}", "runs", False)
            sec.seconds = time.perf_counter() - t0
            print(render_text(sec), flush=True)
            sections[name] = {
                "title": sec.title, "seconds": sec.seconds,
                "figures": [vars(f) for f in sec.figures], "notes": sec.notes,
                "data": sec.data, "run": {**info, "quick": args.quick},
            }
    total = time.perf_counter() - started
    print(f"\nwhole run: {total:.0f} s", flush=True)
    if write:
        results = {"machine": info, "sections": sections,
                   "total_seconds": total if args.names == list(SUITES) else
                   previous.get("total_seconds", total),
                   "argv": " ".join(argv) if args.names == list(SUITES) else
                   previous.get("argv", " ".join(argv))}
        RESULTS.write_text(json.dumps(results, indent=1, default=str) + "\n")
        OUTPUT.write_text(render_markdown(results))
        log(f"wrote {OUTPUT.relative_to(ROOT)} and {RESULTS.relative_to(ROOT)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
