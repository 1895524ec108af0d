"""Benchmark 6, the download pipeline on many small files from a local HTTP server.

Subject: :func:`impl.download.run.download` (HEAD, STREAM, FINALIZE, INDEX effects and
their state changes recorded in a fresh ledger; one worker thread, then four) over M small
files served by :class:`impl.download.testserver.FileServer` on 127.0.0.1. Baseline: plain
sequential ``httpx`` GETs of the same files, each written to a file. The difference per
file is the ledger's (and the pipeline's) overhead per artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from bench.harness import Result, Settings, compare, fmt, overhead, stopwatch

SIZE = 4096


def _available() -> bool:
    try:
        import impl.download.run
        import impl.download.testserver  # noqa: F401
    except ImportError:
        return False
    return True


def _files(settings: Settings) -> int:
    return 30 if settings.quick else 150


def run(settings: Settings) -> list[Result]:
    if not _available():
        print("  skipped: impl.download (run, testserver) is not importable yet")
        return []
    import httpx

    from impl.download.run import download
    from impl.download.testserver import FileServer, generated_bytes

    m = _files(settings)
    results = []
    with FileServer() as server:
        # Without TCP_NODELAY, a response written as headers then body waits for the
        # client's delayed ACK (40 ms on Linux) on a kept-alive connection: that stall
        # would swamp what is measured, on both sides.
        server._httpd.RequestHandlerClass.disable_nagle_algorithm = True  # type: ignore[attr-defined]
        urls = [server.add(f"/f/{i}.bin", generated_bytes(i, SIZE)) for i in range(m)]
        manifest = settings.scratch("download-manifest") / "manifest.jsonl"
        manifest.write_text(
            "".join(
                json.dumps({"work_id": "bench", "artifact_id": f"a{i}", "url": url}) + "\n"
                for i, url in enumerate(urls)
            ),
            encoding="utf-8",
        )

        def pipeline(workers: int) -> float:
            root = settings.scratch("download")
            with stopwatch() as t:
                summary = download(root / "ledger.sqlite", manifest, root / "out", workers=workers)
            if summary.succeeded + summary.deduped != m:
                raise RuntimeError(f"download pipeline: {summary}")
            return m / t[0]

        def plain() -> float:
            out = settings.scratch("download-plain")
            with stopwatch() as t, httpx.Client() as client:
                for i, url in enumerate(urls):
                    response = client.get(url)
                    response.raise_for_status()
                    Path(out / f"{i}.bin").write_bytes(response.content)
            return m / t[0]

        for workers in (1, 4):
            result = compare(
                2 if settings.quick else 3,
                bench="download",
                case=f"{m} files of {SIZE} B, {workers} worker thread{'s' if workers > 1 else ''}",
                unit="files/s",
                subject=("pipeline", lambda _i, w=workers: pipeline(w)),  # type: ignore[misc]
                baseline=("sequential httpx", lambda _i: plain()),
            )
            note = f"overhead about {fmt(overhead(result, 1e3))} ms per file"
            results.append(attrs.evolve(result, note=note))
    return results
