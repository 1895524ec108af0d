"""Benchmark: ``jobledger download`` beside the tools a user would pick instead (issue 15, 4).

A server in another process (:mod:`bench.latency_server`) waits 50 ms before every
response, as a distant host does, and serves M files of 64 KiB. The same URL list is
fetched, 64 transfers at a time, by:

- ``curl --parallel --parallel-max 64`` (the peer the target is a ratio to),
- ``aria2c -j 64`` (reported beside it),
- ``jobledger download --workers 64`` with ``download_per_host=64``, into a fresh ledger.

Each runs as a child process; wall time is measured around it and CPU time (user +
system) from the kernel's accounting of that child (``os.wait4``). Targets: jobledger's
throughput >= 0.5x curl's in the same run, and <= 2 ms of CPU per downloaded file. Then
``jobledger download`` runs again on the finished manifest, and the server's request count
must not move: a finished artifact is never fetched again. A peer that is not installed
is said plainly (``apt-get install curl aria2``) and the rest is measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.harness import Result, Series, Settings, Target

SIZE = 64 * 1024
LATENCY = 0.050
CONCURRENCY = 64
THROUGHPUT_TARGET = Target(0.5)
CPU_TARGET = Target(2.0, at_most=True)
TIMEOUT = 600.0


@contextmanager
def latency_server(files: int) -> Iterator[str]:
    """Start the server in its own process; yield its base URL; stop it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.latency_server",
            "--files",
            str(files),
            "--size",
            str(SIZE),
            "--latency",
            str(LATENCY),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("port "):
            raise RuntimeError(f"the latency server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def requests_served(base: str) -> int:
    """How many file requests the server has answered so far."""
    with urllib.request.urlopen(f"{base}/_stats", timeout=10) as response:
        return int(json.load(response)["requests"])


def measure(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``argv`` to completion; return (wall seconds, CPU seconds of the child)."""
    env = {**os.environ, "NO_COLOR": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = start + TIMEOUT
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            raise RuntimeError(f"{argv[0]} took more than {TIMEOUT:g} s")
        time.sleep(0.002)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {proc.returncode}: {err[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def _count_files(out: Path, files: int, tool: str) -> None:
    found = sum(1 for p in out.rglob("*") if p.is_file() and p.stat().st_size == SIZE)
    if found < files:
        raise RuntimeError(f"{tool}: {found} of {files} files of {SIZE} bytes on disk")


def _curl(urls: list[str], work: Path) -> tuple[float, float]:
    out = work / "curl"
    out.mkdir()
    config = work / "curl.conf"
    config.write_text(
        "".join(f'url = "{u}"\noutput = "{out}/{i}.bin"\n' for i, u in enumerate(urls)),
        encoding="utf-8",
    )
    argv = [
        "curl",
        "--parallel",
        "--parallel-max",
        str(CONCURRENCY),
        "--silent",
        "--show-error",
        "--fail",
        "--config",
        str(config),
    ]
    result = measure(argv, work)
    _count_files(out, len(urls), "curl")
    return result


def _aria2(urls: list[str], work: Path) -> tuple[float, float]:
    out = work / "aria2"
    out.mkdir()
    listing = work / "aria2.txt"
    listing.write_text(
        "".join(f"{u}\n  out={i}.bin\n" for i, u in enumerate(urls)), encoding="utf-8"
    )
    argv = [
        "aria2c",
        "--input-file",
        str(listing),
        "--dir",
        str(out),
        f"--max-concurrent-downloads={CONCURRENCY}",
        "--max-connection-per-server=1",
        "--split=1",
        "--file-allocation=none",
        "--allow-overwrite=true",
        "--auto-file-renaming=false",
        "--console-log-level=warn",
        "--summary-interval=0",
        "--quiet=true",
    ]
    result = measure(argv, work)
    _count_files(out, len(urls), "aria2c")
    return result


def _jobledger_argv(manifest: Path, work: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "impl",
        "--db",
        str(work / "ledger.sqlite"),
        "--set",
        f"download_per_host={CONCURRENCY}",
        "download",
        str(manifest),
        "--out",
        str(work / "jobledger"),
        "--workers",
        str(CONCURRENCY),
    ]


def run(settings: Settings) -> list[Result]:
    files = 300 if settings.quick else 1000
    runs = 1 if settings.quick else min(settings.runs, 3)
    peers = {"curl": shutil.which("curl"), "aria2c": shutil.which("aria2c")}
    for name, path in peers.items():
        if path is None:
            print(f"  {name} is not installed here (apt-get install curl aria2): not measured")
    walls: dict[str, list[float]] = {"jobledger": [], "curl": [], "aria2c": []}
    cpu_ms: list[float] = []
    rerun_requests: list[int] = []
    with latency_server(files) as base:
        urls = [f"{base}/f/{i}.bin" for i in range(files)]
        for run_index in range(runs):
            work = settings.scratch("peers")
            manifest = work / "urls.txt"
            manifest.write_text("".join(u + "\n" for u in urls), encoding="utf-8")
            sides = ["jobledger", "curl", "aria2c"]
            if run_index % 2:
                sides.reverse()
            for side in sides:
                if side == "jobledger":
                    wall, cpu = measure(_jobledger_argv(manifest, work), work)
                    cpu_ms.append(cpu / files * 1e3)
                    before = requests_served(base)
                    measure(_jobledger_argv(manifest, work), work)
                    rerun_requests.append(requests_served(base) - before)
                elif peers[side] is None:
                    continue
                else:
                    wall, cpu = (_curl if side == "curl" else _aria2)(urls, work)
                walls[side].append(wall)
                print(f"    {side}: {wall:.2f} s wall, {cpu:.2f} s CPU for {files} files")
            shutil.rmtree(work, ignore_errors=True)
    case = f"{files} files of 64 KiB, {LATENCY * 1e3:g} ms per response, {CONCURRENCY} at a time"
    rate = {side: tuple(files / w for w in values) for side, values in walls.items()}
    results = [
        Result(
            bench="peers",
            case=f"jobledger download CPU per file, {case}",
            subject=Series("CPU per file", "ms", tuple(cpu_ms), higher=False),
            baseline=None,
            ratio=Series("CPU per file", "ms", tuple(cpu_ms), higher=False),
            target=CPU_TARGET,
            note=f"requests made by a rerun of the finished manifest: {rerun_requests}",
            ok=not any(rerun_requests),
        )
    ]
    for side, target in (("curl", THROUGHPUT_TARGET), ("aria2c", None)):
        if not walls[side]:
            results.append(
                Result(
                    bench="peers",
                    case=f"jobledger download vs {side}: {side} is not installed here",
                    subject=Series("jobledger", "files/s", rate["jobledger"]),
                    baseline=None,
                    ratio=None,
                    note="apt-get install curl aria2, then run again",
                )
            )
            continue
        results.append(
            Result(
                bench="peers",
                case=f"jobledger download vs {side}, {case}",
                subject=Series("jobledger", "files/s", rate["jobledger"]),
                baseline=Series(side, "files/s", rate[side]),
                ratio=Series(
                    "ratio",
                    "x",
                    tuple(j / p for j, p in zip(rate["jobledger"], rate[side], strict=True)),
                ),
                target=target,
            )
        )
    return results
