"""``prune`` throughput while a worker runs, and the worker's throughput meanwhile (SQLite).

A ledger of finished jobs (built with bulk SQL, as for ``lease_next``) plus a backlog for
one worker process, which runs the lifecycle (lease, one no-op effect, advance) and notes
when each job finished. Each run measures, in this order: the worker alone for a while
(its jobs/s: the baseline), then the same worker while the parent prunes every finished
job in batches of the default size (the subject: the worker's jobs/s during the prune's
window), and reports the prune's own rate (jobs removed per second, with the incremental
vacuum and checkpoint after it included) and the longest pause the worker saw between two
jobs. Target: the worker keeps at least half its throughput while a prune runs.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

from bench import lease, ledger
from bench.harness import Result, Series, Settings, Target, fmt
from impl import Plan

TARGET = Target(0.5)


def _worker(path: str, jobs: int, log: str) -> None:
    store = ledger.open_sqlite(Path(path))
    stamps = []
    try:
        for _ in range(jobs):
            held = store.lease_next("bench-worker")
            if held is None:
                break
            store.run_effect(held, "op", ledger.noop)
            store.advance(held, "DONE")
            stamps.append(time.time())
    finally:
        store.close()
    Path(log).write_text(json.dumps(stamps))


def _start(path: Path, jobs: int, log: Path) -> mp.process.BaseProcess:
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_worker, args=(str(path), jobs, str(log)))
    proc.start()
    return proc


def _rate(stamps: list[float], start: float, end: float) -> float:
    inside = [s for s in stamps if start <= s <= end]
    return len(inside) / max(end - start, 1e-9)


def _one_run(settings: Settings, size: int, backlog: int) -> tuple[float, float, float, float]:
    path = settings.scratch(f"prune-{size}") / "ledger.sqlite"
    lease.build(path, size)
    store = ledger.open_sqlite(path)
    try:
        store.plan_many(ledger.KIND, [Plan({"w": i}) for i in range(2 * backlog)])
        finished = sum(
            n for s, n in store.stats().by_state[ledger.KIND].items() if s in ("DONE", "FAILED")
        )
        # Alone: the baseline rate.
        log = path.with_suffix(".alone.json")
        proc = _start(path, backlog, log)
        proc.join()
        stamps = json.loads(log.read_text())
        alone = _rate(stamps, stamps[len(stamps) // 10], stamps[-1])
        # With a prune of every finished job running beside it.
        log = path.with_suffix(".pruned.json")
        proc = _start(path, backlog, log)
        time.sleep(0.2)
        start = time.time()
        report = store.prune(finished_before=store.now())
        end = time.time()
        proc.join()
        stamps = json.loads(log.read_text())
        during = _rate(stamps, start, end)
        window = [s for s in stamps if start <= s <= end]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        assert report.jobs >= finished, (report, finished)
        return alone, during, report.jobs / (end - start), max(gaps, default=0.0)
    finally:
        store.close()


def run(settings: Settings) -> list[Result]:
    size = 30_000 if settings.quick else 300_000
    backlog = 3_000 if settings.quick else 20_000
    runs = min(settings.runs, 3)
    alone: list[float] = []
    during: list[float] = []
    rate: list[float] = []
    pause: list[float] = []
    for _ in range(runs):
        a, d, r, p = _one_run(settings, size, backlog)
        alone.append(a)
        during.append(d)
        rate.append(r)
        pause.append(p * 1000)
        print(
            f"  worker alone {a:,.0f} jobs/s, during the prune {d:,.0f} jobs/s; "
            f"prune {r:,.0f} jobs/s"
        )
    ratios = tuple(d / a for a, d in zip(alone, during, strict=True))
    return [
        Result(
            bench="prune",
            case=f"worker beside a prune of {fmt(size * 0.99)} finished jobs (SQLite)",
            subject=Series("worker during prune", "jobs/s", tuple(during)),
            baseline=Series("worker alone", "jobs/s", tuple(alone)),
            ratio=Series("ratio", "x", ratios),
            target=TARGET,
            note=(
                f"prune removed {statistics.median(rate):,.0f} jobs/s while the worker ran; "
                f"the worker's longest pause between two jobs during it: "
                f"{statistics.median(pause):.0f} ms (median of runs)"
            ),
        ),
        Result(
            bench="prune",
            case="prune rate while a worker runs (SQLite, default batch)",
            subject=Series("prune", "jobs/s", tuple(rate)),
            baseline=None,
            ratio=None,
        ),
    ]
