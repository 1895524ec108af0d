"""Benchmark: what a download loop on asyncio would cost over today's ledger API (issue 15).

Before ``jobledger download`` is rebuilt on an event loop, this measures the loop it would
become, on the same server as ``peers`` (50 ms per response, files of 64 KiB, 64 at a
time), each variant a child process timed by ``os.wait4`` beside ``curl --parallel``:

- ``loop``: one thread; the sync ``SqliteStore`` called on the event loop's own thread,
  effects driven through the store's durable steps (``effect_steps``), aiohttp for HTTP;
- ``aio``: the same loop over ``impl.aio``'s ``AsyncStore`` (every ledger step on the
  store's thread);
- ``nohttp``: ``loop`` with the HTTP taken out (bodies made locally): the ledger, index
  and file-system part of the bill alone.

The fsyncs (the partial file's, and ``Layout.finalize`` with its rename and directory
fsyncs) run on the default executor's threads: on a real disk each blocks for
milliseconds, and on the loop's thread they serialised the whole run (measured: 300 files
in 15 s with no HTTP at all, 5 fsyncs of about 4.5 ms each per file).

Every variant does per file what ``DownloadHandler`` does for a fresh job, in the same
order and with the same durability: ``lease_next``; ``HEAD`` (a HEAD request, then the
claim in the artifact index) recorded; ``HEAD_DONE``; ``STREAMING``; the round read from
the history; ``STREAM`` (the GET into the partial file, hashed, fsynced); ``FINALIZE``
(``Layout.finalize``: fsync, rename, directory fsyncs); ``FINALIZED``; ``INDEX`` (the
index row); ``INDEXED``: 13 ledger writes and one read, two index transactions, five
fsyncs. No lease renewal (a run is shorter than the TTL). It is a floor for the design,
not the product: no retries, breakers or pauses.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.harness import Result, Series, Settings
from bench.peers import CONCURRENCY, SIZE, latency_server, measure

VARIANTS = ("loop", "aio", "nohttp")


class _LoopLedger:
    """The sync store, called on the loop's thread (effects through their steps)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.store, name)(*args, **kwargs)

    async def effect(self, lease: Any, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        from model.effectstep import RunFn

        steps = self.store.effect_steps(lease, op)
        try:
            step = next(steps)
            while True:
                assert isinstance(step, RunFn)
                step = steps.send(await fn())
        except StopIteration as stop:
            return stop.value


class _AioLedger:
    def __init__(self, store: Any) -> None:
        self.store = store

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.store, name)(*args, **kwargs)

    async def effect(self, lease: Any, op: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        async def run(_ctx: Any) -> Any:
            return await fn()

        return await self.store.run_effect(lease, op, run)


async def _drive(variant: str, urls: list[str], work: Path) -> None:
    import aiohttp

    import impl.aio
    from impl.download.cas import Layout
    from impl.download.index import Artifact, ArtifactIndex
    from impl.download.pipeline import KIND
    from impl.sqlite.store import SqliteStore

    layout = Layout(work / "out")
    layout.ensure()
    index = ArtifactIndex(layout.root)
    db = work / "ledger.sqlite"
    if variant == "aio":
        store_cm: Any = impl.aio.open_store(str(db))
        store = await store_cm.__aenter__()
        ledger: Any = _AioLedger(store)
    else:
        sync = SqliteStore(db)
        ledger = _LoopLedger(sync)
    items = [
        {"work_id": "w", "artifact_id": str(i), "canonical_url": u} for i, u in enumerate(urls)
    ]
    await ledger.call("plan_many", KIND, items)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, ssl=True)
    timeout = aiohttp.ClientTimeout(sock_connect=30.0, sock_read=30.0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=True, auto_decompress=False
    ) as session:

        async def one(lease: Any) -> None:
            job_id = lease.job_id
            url = str(lease.identity["canonical_url"])

            async def head() -> Any:
                if variant == "nohttp":
                    etag, final = None, url
                else:
                    async with session.head(url, allow_redirects=True) as response:
                        etag, final = response.headers.get("etag"), str(response.url)
                key = hashlib.sha256(f"{final}|{etag}".encode()).hexdigest()
                holder = index.claim(key, job_id, final)
                return {"final_url": final, "etag": etag, "duplicate_of": None, "h": holder}

            info = await ledger.effect(lease, "HEAD", head)
            await ledger.call("advance", lease, "HEAD_DONE")
            await ledger.call("advance", lease, "STREAMING")
            await ledger.call("history", job_id)

            async def stream() -> Any:
                part = layout.part_path(job_id)
                fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                digest = hashlib.sha256()
                size = 0
                try:
                    if variant == "nohttp":
                        chunks = [os.urandom(SIZE)]
                        for chunk in chunks:
                            os.write(fd, chunk)
                            digest.update(chunk)
                            size += len(chunk)
                    else:
                        async with session.get(url, allow_redirects=True) as response:
                            response.raise_for_status()
                            async for chunk in response.content.iter_chunked(SIZE):
                                os.write(fd, chunk)
                                digest.update(chunk)
                                size += len(chunk)
                    # fsync blocks for milliseconds on a real disk: off the loop.
                    await asyncio.to_thread(os.fsync, fd)
                finally:
                    os.close(fd)
                return {"sha256": digest.hexdigest(), "size": size}

            got = await ledger.effect(lease, "STREAM", stream)

            async def finalize() -> Any:
                done = await asyncio.to_thread(layout.finalize, job_id, got["sha256"], got["size"])
                return {"path": done.path, "existed": done.existed}

            final = await ledger.effect(lease, "FINALIZE", finalize)
            await ledger.call("advance", lease, "FINALIZED")

            async def add() -> Any:
                row = index.add(
                    Artifact(
                        job_id=job_id,
                        artifact_id=str(lease.identity["artifact_id"]),
                        work_id="w",
                        url=url,
                        final_url=str(info["final_url"]),
                        sha256=got["sha256"],
                        size=got["size"],
                        content_type=None,
                        path=str(final["path"]),
                    )
                )
                return {"duplicate_of": row.duplicate_of}

            await ledger.effect(lease, "INDEX", add)
            await ledger.call("advance", lease, "INDEXED")

        async def worker(n: int) -> None:
            while True:
                lease = await ledger.call("lease_next", f"bench/{n}", kinds=[KIND])
                if lease is None:
                    return
                await one(lease)

        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
    index.close()
    if variant == "aio":
        await store_cm.__aexit__(None, None, None)
    else:
        sync.close()


def run(settings: Settings) -> list[Result]:
    files = 300 if settings.quick else 1000
    runs = 1 if settings.quick else min(settings.runs, 3)
    sides = [*VARIANTS, "curl"] if shutil.which("curl") else list(VARIANTS)
    walls: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    with latency_server(files) as base:
        urls = [f"{base}/f/{i}.bin" for i in range(files)]
        for run_index in range(runs):
            order = sides if run_index % 2 == 0 else list(reversed(sides))
            for side in order:
                work = settings.scratch("dlfloor")
                listing = work / "urls.txt"
                listing.write_text("".join(u + "\n" for u in urls), encoding="utf-8")
                if side == "curl":
                    conf = work / "curl.conf"
                    conf.write_text(
                        "".join(
                            f'url = "{u}"\noutput = "{work}/{i}.bin"\n' for i, u in enumerate(urls)
                        ),
                        encoding="utf-8",
                    )
                    argv = ["curl", "--parallel", "--parallel-max", str(CONCURRENCY)]
                    argv += ["--silent", "--show-error", "--fail", "--config", str(conf)]
                else:
                    argv = [sys.executable, "-m", "bench.dlfloor", side, str(listing), str(work)]
                wall, cpu = measure(argv, work)
                walls[side].append(wall)
                cpus[side].append(cpu / files * 1e3)
                print(f"    {side}: {wall:.2f} s wall, {cpu / files * 1e3:.2f} ms CPU per file")
                shutil.rmtree(work, ignore_errors=True)
    case = f"{files} files of 64 KiB, 50 ms per response, {CONCURRENCY} at a time"
    curl_rate = tuple(files / w for w in walls["curl"]) if "curl" in walls else None
    results = []
    for side in VARIANTS:
        rate = tuple(files / w for w in walls[side])
        results.append(
            Result(
                bench="dlfloor",
                case=f"asyncio download loop ({side}), {case}",
                subject=Series(side, "files/s", rate),
                baseline=Series("curl", "files/s", curl_rate) if curl_rate else None,
                ratio=Series(
                    "ratio", "x", tuple(a / b for a, b in zip(rate, curl_rate, strict=True))
                )
                if curl_rate
                else None,
                note=f"CPU per file {Series('cpu', 'ms', tuple(cpus[side]), False).show()}",
            )
        )
    return results


def main() -> None:
    variant, listing, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    urls = [line for line in listing.read_text(encoding="utf-8").splitlines() if line]
    start = time.perf_counter()
    asyncio.run(_drive(variant, urls, work))
    print(f"{variant}: {len(urls)} files in {time.perf_counter() - start:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
