"""``python -m bench [--quick] [--only NAME ...] [--runs N] [--pg URL] [--profile]``.

Runs the selected benchmarks, prints each one's median, min and max as it goes, then a
final table with the ratio of every subject to its same-run baseline and PASS/MISS for
every target. Exit status is 0 whatever the verdicts (a benchmark is a measurement, not
a test), and 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from bench import (
    aio,
    clients,
    dlfloor,
    download,
    fleet,
    lease,
    lifecycle,
    pages,
    peers,
    pickup,
    plan,
    procs,
    prune,
    runtime,
    status,
)
from bench.harness import Result, Settings, cpu_info, fmt

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"

BENCHMARKS: dict[str, Callable[[Settings], list[Result]]] = {
    "lifecycle": lifecycle.run,
    "plan_many": plan.run,
    "lease_next": lease.run,
    "sqlite_procs": procs.run_sqlite,
    "postgres_procs": procs.run_postgres,
    "worker": runtime.run,
    "download": download.run,
    "page_size": pages.run,
    "fleet_sqlite": fleet.run_sqlite,
    "fleet_postgres": fleet.run_postgres,
    "peers": peers.run,
    "clients": clients.run,
    "dlfloor": dlfloor.run,
    "status": status.run,
    "prune": prune.run,
    "pickup": pickup.run,
    "aio": aio.run,
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="jobledger benchmarks, each as a ratio to its baseline in the same run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, 3 runs, no 1M-job table (< 2 min)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these (repeat or comma-separate): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement")
    parser.add_argument(
        "--pg",
        default=os.environ.get("JOBLEDGER_BENCH_PG", PG_DEFAULT),
        help="PostgreSQL URL for postgres_procs ('' to skip); default $JOBLEDGER_BENCH_PG or "
        + PG_DEFAULT,
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print a cProfile summary of the API side"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown}; choose from {', '.join(BENCHMARKS)}")
    args.only = names or list(BENCHMARKS)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def table(results: list[Result]) -> str:
    """The final table, as Markdown (it reads in a terminal and pastes into the README)."""
    lines = [
        "| benchmark | case | jobledger (median [min..max]) | baseline (median [min..max]) "
        "| ratio (median [min..max]) | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = f"{r.baseline.label}: {r.baseline.show()}" if r.baseline else ""
        ratio = r.ratio.show() if r.ratio else ""
        target = r.target.show() if r.target else ""
        lines.append(
            f"| {r.bench} | {r.case} | {r.subject.label}: {r.subject.show()} | {base} "
            f"| {ratio} | {target} | {r.verdict} |"
        )
    notes = [f"- {r.bench}, {r.case}: {r.note}" for r in results if r.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    runs = args.runs if args.runs is not None else (3 if args.quick else 5)
    settings = Settings(quick=args.quick, runs=runs, pg_url=args.pg or None, profile=args.profile)
    print(f"machine: {cpu_info()}")
    print(f"runs per measurement: {runs}{' (quick)' if args.quick else ''}")
    started = time.monotonic()
    results: list[Result] = []
    try:
        for name in args.only:
            print(f"\n== {name}")
            t0 = time.monotonic()
            try:
                found = BENCHMARKS[name](settings)
            except Exception as exc:  # one broken benchmark must not hide the others
                print(f"  FAILED: {type(exc).__name__}: {exc}")
                continue
            for r in found:
                print(f"  {r.case}")
                print(f"    {r.subject.label}: {r.subject.show()}")
                if r.baseline is not None:
                    print(f"    {r.baseline.label}: {r.baseline.show()}")
                if r.ratio is not None:
                    target = f"  target {r.target.show()}" if r.target else ""
                    print(f"    ratio: {r.ratio.show()}{target}  {r.verdict}")
                if r.note:
                    print(f"    {r.note}")
            print(f"  ({time.monotonic() - t0:.0f} s)")
            results.extend(found)
    finally:
        settings.cleanup()
    print(f"\n== results ({time.monotonic() - started:.0f} s)\n")
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([_as_json(r) for r in results], f, indent=2)
    return 0


def _as_json(r: Result) -> dict[str, object]:
    def series(s: object) -> object:
        if s is None:
            return None
        return {
            "label": s.label,  # type: ignore[attr-defined]
            "unit": s.unit,  # type: ignore[attr-defined]
            "values": list(s.values),  # type: ignore[attr-defined]
            "median": s.median,  # type: ignore[attr-defined]
        }

    return {
        "bench": r.bench,
        "case": r.case,
        "subject": series(r.subject),
        "baseline": series(r.baseline),
        "ratio": series(r.ratio),
        "target": r.target.show() if r.target else None,
        "verdict": r.verdict,
        "note": r.note,
        "formatted_ratio": fmt(r.ratio.median) if r.ratio else None,
    }


if __name__ == "__main__":
    sys.exit(main())
