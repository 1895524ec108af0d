"""Timing harness: repeated, interleaved runs of a subject and its baseline, and results.

Every benchmark measures what jobledger does (the *subject*) and the physical limit it is
compared with (the *baseline*) in the same process, alternating them run by run, so the
ratio between the two survives a noisy machine even when the absolute numbers do not.
The ratio reported is the median of the per-run ratios (each subject run paired with the
baseline run next to it).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from attrs import define, field, frozen


@frozen
class Series:
    """Several measurements of one quantity (``higher`` says which way is better)."""

    label: str
    unit: str
    values: tuple[float, ...]
    higher: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def show(self) -> str:
        """``median [min..max] unit`` with a sensible number of digits."""
        return f"{fmt(self.median)} [{fmt(self.low)}..{fmt(self.high)}] {self.unit}"


@frozen
class Target:
    """A target on a ratio: ``ratio >= bound`` (or ``<=`` when ``at_most``)."""

    bound: float
    at_most: bool = False

    def met(self, ratio: float) -> bool:
        return ratio <= self.bound if self.at_most else ratio >= self.bound

    def show(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:g}"


@frozen
class Result:
    """One line of the final table."""

    bench: str
    case: str
    subject: Series
    baseline: Series | None
    ratio: Series | None
    target: Target | None = None
    note: str = ""
    ok: bool = True  # False when a hard condition (a busy error, a lost job) failed

    @property
    def verdict(self) -> str:
        if self.target is None or self.ratio is None:
            return "" if self.ok else "MISS"
        return "PASS" if self.ok and self.target.met(self.ratio.median) else "MISS"


@define
class Settings:
    """What the command line asked for."""

    quick: bool = False
    runs: int = 5
    pg_url: str | None = None
    profile: bool = False
    workdir: Path = field(factory=lambda: Path(tempfile.mkdtemp(prefix="jobledger-bench-")))

    def scratch(self, name: str) -> Path:
        """A fresh directory under the run's work directory."""
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def fmt(value: float) -> str:
    """Three significant digits, without scientific notation for the usual ranges."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def paired(
    runs: int,
    subject: Callable[[int], float],
    baseline: Callable[[int], float],
) -> tuple[list[float], list[float], list[float]]:
    """Run subject and baseline ``runs`` times each, alternating which goes first.

    Each callable takes the run index and returns one measurement (higher is better).
    Returns the subject values, the baseline values and the per-run ratios.
    """
    subj: list[float] = []
    base: list[float] = []
    for i in range(runs):
        if i % 2 == 0:
            b = baseline(i)
            s = subject(i)
        else:
            s = subject(i)
            b = baseline(i)
        subj.append(s)
        base.append(b)
    return subj, base, [s / b for s, b in zip(subj, base, strict=True)]


Side = tuple[str, Callable[[int], float]]
"""A label and one run of it (takes the run index, returns a rate: higher is better)."""


def compare(
    runs: int,
    *,
    bench: str,
    case: str,
    unit: str,
    subject: Side,
    baseline: Side,
    target: Target | None = None,
) -> Result:
    """Run ``subject`` and ``baseline`` :func:`paired` and make their line of the table."""
    subj, base, ratios = paired(runs, subject[1], baseline[1])
    return Result(
        bench=bench,
        case=case,
        subject=Series(subject[0], unit, tuple(subj)),
        baseline=Series(baseline[0], unit, tuple(base)),
        ratio=Series("ratio", "x", tuple(ratios)),
        target=target,
    )


def overhead(result: Result, scale: float) -> float:
    """The median extra time per item of the subject over the baseline, times ``scale``."""
    assert result.baseline is not None
    pairs = zip(result.subject.values, result.baseline.values, strict=True)
    return statistics.median((1 / s - 1 / b) * scale for s, b in pairs)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...``; afterwards ``t[0]`` holds the seconds elapsed."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def profile(fn: Callable[[], object], *, title: str, limit: int = 18) -> str:
    """Run ``fn`` under cProfile; return the top functions by own time and cumulative time."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    out = io.StringIO()
    out.write(f"\n--- profile: {title} ---\n")
    stats = pstats.Stats(prof, stream=out)
    stats.strip_dirs()
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def cpu_info() -> str:
    """One line describing the machine: CPU model, cores, Python and SQLite versions."""
    import platform
    import sqlite3

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )
