"""Benchmark: which HTTP client can carry ``jobledger download`` (issue 15, target 4).

The same server as ``peers`` (:mod:`bench.latency_server`: 50 ms before every response,
files of 64 KiB) is asked for the same URL list, 64 requests at a time, by bare loops over
each candidate client, each loop a child process (``python -m bench.clients CLIENT URLS``)
whose CPU time (user + system) is read from the kernel's accounting of that child
(``os.wait4``), so the figures compare like with like and include the interpreter's start:

- ``httpx-sync``: ``httpx.Client`` shared by 64 threads (what the download command used);
- ``httpx-async``: ``httpx.AsyncClient``, 64 tasks on one event loop;
- ``aiohttp``: ``aiohttp.ClientSession``, 64 tasks on one event loop;
- ``pycurl``: libcurl's multi interface driven from one thread;
- ``curl``: ``curl --parallel --parallel-max 64`` (the peer of ``peers``), for scale.

Every loop reads each body in chunks and discards it (no disk), with the settings the
download pipeline needs switched on (timeouts, redirects followed, TLS verification,
proxies from the environment), so what is measured is the client's own cost per request.
A client that is not installed is said plainly and the rest is measured.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.harness import Result, Series, Settings
from bench.peers import CONCURRENCY, latency_server

CLIENTS = ("httpx-sync", "httpx-async", "aiohttp", "pycurl")
CHUNK = 64 * 1024


def _httpx_sync(urls: list[str]) -> int:
    import httpx

    got = 0
    lock = threading.Lock()
    todo = iter(urls)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    with httpx.Client(
        timeout=httpx.Timeout(30.0), follow_redirects=True, verify=True, limits=limits
    ) as client:

        def work() -> None:
            nonlocal got
            while True:
                with lock:
                    url = next(todo, None)
                if url is None:
                    return
                with client.stream("GET", url) as response:
                    response.raise_for_status()
                    n = sum(len(c) for c in response.iter_raw(CHUNK))
                with lock:
                    got += n

        threads = [threading.Thread(target=work) for _ in range(CONCURRENCY)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return got


async def _httpx_async(urls: list[str]) -> int:
    import httpx

    todo = iter(urls)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(30.0), follow_redirects=True, verify=True, limits=limits
    ) as client:

        async def work() -> int:
            n = 0
            for url in todo:
                async with client.stream("GET", url) as response:
                    response.raise_for_status()
                    async for chunk in response.aiter_raw(CHUNK):
                        n += len(chunk)
            return n

        return sum(await asyncio.gather(*(work() for _ in range(CONCURRENCY))))


async def _aiohttp(urls: list[str]) -> int:
    import aiohttp

    todo = iter(urls)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, ssl=True)
    timeout = aiohttp.ClientTimeout(sock_connect=30.0, sock_read=30.0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=True, auto_decompress=False
    ) as session:

        async def work() -> int:
            n = 0
            for url in todo:
                async with session.get(url, allow_redirects=True, max_redirects=10) as response:
                    response.raise_for_status()
                    async for chunk in response.content.iter_chunked(CHUNK):
                        n += len(chunk)
            return n

        return sum(await asyncio.gather(*(work() for _ in range(CONCURRENCY))))


def _pycurl(urls: list[str]) -> int:
    import pycurl  # type: ignore[import-untyped]

    multi = pycurl.CurlMulti()
    multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, CONCURRENCY)
    got = 0
    todo = list(reversed(urls))
    free: list[pycurl.Curl] = []
    for _ in range(CONCURRENCY):
        handle = pycurl.Curl()
        handle.setopt(pycurl.FOLLOWLOCATION, 1)
        handle.setopt(pycurl.MAXREDIRS, 10)
        handle.setopt(pycurl.CONNECTTIMEOUT, 30)
        handle.setopt(pycurl.LOW_SPEED_TIME, 30)
        handle.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        handle.setopt(pycurl.SSL_VERIFYPEER, 1)
        free.append(handle)

    def sink(data: bytes) -> None:
        nonlocal got
        got += len(data)

    active = 0
    while todo or active:
        while todo and free:
            handle = free.pop()
            handle.setopt(pycurl.URL, todo.pop())
            handle.setopt(pycurl.WRITEFUNCTION, sink)
            multi.add_handle(handle)
            active += 1
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        _queued, ok, failed = multi.info_read()
        for handle in ok:
            multi.remove_handle(handle)
            free.append(handle)
            active -= 1
        if failed:
            raise RuntimeError(f"pycurl: {failed[0][2]}")
        multi.select(1.0)
    return got


def fetch(client: str, urls: list[str]) -> int:
    """Fetch every URL with ``client``; return the bytes received."""
    if client == "httpx-sync":
        return _httpx_sync(urls)
    if client == "httpx-async":
        return asyncio.run(_httpx_async(urls))
    if client == "aiohttp":
        return asyncio.run(_aiohttp(urls))
    if client == "pycurl":
        return _pycurl(urls)
    raise SystemExit(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")


def _installed(client: str) -> bool:
    module = {"httpx-sync": "httpx", "httpx-async": "httpx"}.get(client, client)
    probe = [sys.executable, "-c", f"import {module}"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def _measure(argv: list[str], cwd: Path) -> tuple[float, float]:
    from bench.peers import measure

    return measure(argv, cwd)


def run(settings: Settings) -> list[Result]:
    files = 300 if settings.quick else 1000
    runs = 1 if settings.quick else min(settings.runs, 3)
    sides = [c for c in CLIENTS if _installed(c)]
    for client in CLIENTS:
        if client not in sides:
            print(f"  {client} is not installed here (pip install it): not measured")
    curl = shutil.which("curl")
    if curl is None:
        print("  curl is not installed here (apt-get install curl): not measured")
    else:
        sides.append("curl")
    walls: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    with latency_server(files) as base:
        urls = [f"{base}/f/{i}.bin" for i in range(files)]
        for run_index in range(runs):
            work = settings.scratch("clients")
            listing = work / "urls.txt"
            listing.write_text("".join(u + "\n" for u in urls), encoding="utf-8")
            order = sides if run_index % 2 == 0 else list(reversed(sides))
            for side in order:
                if side == "curl":
                    conf = work / "curl.conf"
                    conf.write_text(
                        "".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls),
                        encoding="utf-8",
                    )
                    argv = ["curl", "--parallel", "--parallel-max", str(CONCURRENCY)]
                    argv += ["--silent", "--show-error", "--fail", "--config", str(conf)]
                else:
                    argv = [sys.executable, "-m", "bench.clients", side, str(listing)]
                wall, cpu = _measure(argv, work)
                walls[side].append(wall)
                cpus[side].append(cpu / files * 1e3)
                print(f"    {side}: {wall:.2f} s wall, {cpu / files * 1e3:.2f} ms CPU per file")
            shutil.rmtree(work, ignore_errors=True)
    case = f"{files} GETs of 64 KiB, 50 ms per response, {CONCURRENCY} at a time"
    results = []
    for side in sides:
        rate = tuple(files / w for w in walls[side])
        base_rate = tuple(files / w for w in walls["curl"]) if "curl" in walls else None
        results.append(
            Result(
                bench="clients",
                case=f"{side}, {case}",
                subject=Series(side, "files/s", rate),
                baseline=Series("curl", "files/s", base_rate) if base_rate else None,
                ratio=Series(
                    "ratio", "x", tuple(a / b for a, b in zip(rate, base_rate, strict=True))
                )
                if base_rate
                else None,
                note=f"CPU per file {Series('cpu', 'ms', tuple(cpus[side]), False).show()}",
            )
        )
    return results


def main() -> None:
    client, listing = sys.argv[1], Path(sys.argv[2])
    urls = [line for line in listing.read_text(encoding="utf-8").splitlines() if line]
    start = time.perf_counter()
    got = fetch(client, urls)
    if got < len(urls):
        raise SystemExit(f"{client}: only {got} bytes for {len(urls)} URLs")
    print(f"{client}: {got} bytes in {time.perf_counter() - start:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
