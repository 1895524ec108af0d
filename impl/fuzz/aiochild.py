"""An async fuzz worker process: ``python -m impl.fuzz.aiochild SPEC_JSON``.

The async flavour of :mod:`impl.fuzz.child`: the same spec, clock, history log, sink and
workflow, run by an :class:`impl.aio.AsyncWorker` with :data:`TASKS` tasks on one event
loop, each effect an ``async def`` that awaits its pause and the fenced sink (whose
SQLite connection lives on a thread of its own, as the ledger's does). It stops on
SIGTERM (the AsyncWorker's own handler) or dies by SIGKILL, from the parent or from a
failpoint armed in its environment, which then lands on the store's thread.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from impl.aio.store import AsyncStore
from impl.aio.thread import StoreThread
from impl.aio.worker import AsyncHandler, AsyncJobContext, AsyncWorker
from impl.failpoint import ENV_VAR
from impl.fuzz.child import OPEN_ATTEMPTS, ChildSpec, _exit_when_orphaned
from impl.fuzz.clock import ClockReader
from impl.fuzz.history import HistoryWriter
from impl.fuzz.ledger import is_postgres
from impl.fuzz.sink import FencedSink
from impl.fuzz.workload import KIND, STEPS, WORKFLOW, FencedOut, next_state, step_then
from impl.store import open_store
from model.effectstep import SteppedStore
from model.errors import JobledgerError, LeaseLost, StorageError
from model.key import Scalar, op_key
from model.record import JSON, EffectContext

TASKS = 2
"""Handler tasks per process: jobs of one process interleave at every await."""


class AsyncTools:
    """The handler's sink (on its own thread) and history logs, one per task.

    The checker ties each log's writer to the leases the ledger granted it, and every
    task leases under its own name (``w0001/0``), so each task logs to its own file
    beside the process's (``w0001.0.jsonl`` beside ``w0001.jsonl``).
    """

    def __init__(
        self,
        name: str,
        sink: FencedSink,
        sink_thread: StoreThread,
        log: HistoryWriter,
        clock: ClockReader,
    ) -> None:
        self.name = name
        self.sink = sink
        self.sink_thread = sink_thread
        self.process_log = log
        self.clock = clock
        self.logs: dict[str, HistoryWriter] = {}
        self.counter = 0

    def log_for(self, worker: str) -> HistoryWriter:
        """The history log of the task leasing as ``worker``."""
        if worker not in self.logs:
            suffix = worker.rpartition("/")[2]
            path = self.process_log.path.with_suffix(f".{suffix}.jsonl")
            self.logs[worker] = HistoryWriter(path, worker, self.clock)
        return self.logs[worker]

    def close(self) -> None:
        """Close the tasks' logs."""
        for log in self.logs.values():
            log.close()

    def exec_id(self) -> str:
        """Return a new execution id, unique across the whole run."""
        self.counter += 1
        return f"{self.name}#{self.counter}"


def make_async_handler(
    tools: AsyncTools, rng: random.Random, *, pause: float, yield_rate: float
) -> AsyncHandler:
    """The async twin of :func:`impl.fuzz.workload.make_handler`, logging the same way."""

    async def effect(
        ctx: AsyncJobContext,
        op: str,
        extras: Mapping[str, Scalar] | None,
        then: str | None = None,
    ) -> JSON:
        job_id, worker, token = ctx.job_id, ctx.lease.worker, ctx.lease.token
        log = tools.log_for(worker)

        async def fn(ectx: EffectContext) -> JSON:
            exec_id = tools.exec_id()
            log.write("exec", job=job_id, op=op, op_key=ectx.op_key, token=ectx.token, exec=exec_id)
            if pause:
                await asyncio.sleep(rng.random() * pause)
            accepted = await tools.sink_thread.call(
                lambda: tools.sink.execute(
                    job_id=job_id,
                    op=op,
                    op_key=ectx.op_key,
                    token=ectx.token,
                    exec_id=exec_id,
                    worker=worker,
                )
            )
            log.write(
                "sink", job=job_id, op_key=ectx.op_key, token=ectx.token, exec=exec_id, ok=accepted
            )
            if not accepted:
                raise FencedOut(f"the sink fenced out token {ectx.token} of job {job_id}")
            return {"exec": exec_id, "token": ectx.token}

        result = await ctx.effect(op, fn, extras=extras, then=then)
        log.write(
            "result",
            job=job_id,
            op=op,
            op_key=op_key(job_id, op, extras),
            token=token,
            result=result,
        )
        return result

    async def handler(ctx: AsyncJobContext) -> None:
        lease = ctx.lease
        log = tools.log_for(lease.worker)
        log.write(
            "lease", job=lease.job_id, token=lease.token, attempt=lease.attempt, state=lease.state
        )
        try:
            payload = lease.payload if isinstance(lease.payload, dict) else {}
            if payload.get("flaky") and lease.attempt == 1:
                raise RuntimeError("a flaky job fails its first attempt on purpose")
            while not ctx.is_terminal():
                state = ctx.state
                steps = STEPS[state]
                then = step_then(state, rng)
                results = [
                    await effect(ctx, op, x, then if i == len(steps) - 1 else None)
                    for i, (op, x) in enumerate(steps)
                ]
                target = next_state(state, results)
                moved = ctx.state != state if then is not None else await ctx.advance(target)
                log.write(
                    "advance",
                    job=lease.job_id,
                    token=lease.token,
                    frm=state,
                    to=target,
                    moved=moved,
                )
                if not ctx.is_terminal() and rng.random() < yield_rate:
                    log.write("yield", job=lease.job_id, token=lease.token, state=ctx.state)
                    return
            log.write("end", job=lease.job_id, token=lease.token, state=ctx.state)
        except LeaseLost as exc:
            log.write("lost", job=lease.job_id, token=lease.token, why=str(exc))
            raise
        except (JobledgerError, FencedOut, RuntimeError) as exc:
            log.write(
                "error", job=lease.job_id, token=lease.token, error=f"{type(exc).__name__}: {exc}"
            )
            raise

    return handler


async def _open(spec: ChildSpec, clock: ClockReader, log: HistoryWriter) -> AsyncStore:
    # As the threaded child does: retry a start-up that met a disconnect.
    for attempt in range(1, OPEN_ATTEMPTS + 1):

        def make() -> SteppedStore:
            store = open_store(spec.db, clock=clock, config=spec.config())
            try:
                store.register(WORKFLOW)
            except BaseException:
                store.close()
                raise
            return cast(SteppedStore, store)

        store = AsyncStore(make, threads=4 if is_postgres(spec.db) else 1)
        try:
            return await store.open()
        except StorageError as exc:
            log.write("open-failed", attempt=attempt, error=f"{type(exc).__name__}: {exc}")
            if attempt == OPEN_ATTEMPTS:
                raise
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


async def _serve(spec: ChildSpec, clock: ClockReader, log: HistoryWriter) -> None:
    sink_thread = StoreThread()
    sink = await sink_thread.call(lambda: FencedSink(Path(spec.sink)))
    store = await _open(spec, clock, log)
    tools = AsyncTools(spec.name, sink, sink_thread, log, clock)
    try:
        rng = random.Random(spec.seed)
        handler = make_async_handler(tools, rng, pause=spec.pause, yield_rate=spec.yield_rate)
        worker = AsyncWorker(
            store,
            {KIND: handler},
            name=spec.name,
            ttl=spec.ttl,
            concurrency=TASKS,
            renew_every=spec.renew_every,
            idle_poll=spec.idle_poll,
        )
        report = await worker.run()
        log.write("stop", jobs=report.jobs, finished=report.finished, lost=report.lost)
    finally:
        await store.close()
        tools.close()
        await sink_thread.call(sink.close)
        sink_thread.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Run one async fuzz worker until stopped; return its exit status."""
    args = sys.argv[1:] if argv is None else argv
    threading.Thread(
        target=_exit_when_orphaned, args=(os.getppid(),), name="orphan-watch", daemon=True
    ).start()
    spec = ChildSpec.from_json(args[0])
    if is_postgres(spec.db):
        import impl.postgres.store  # noqa: F401, PLC0415  (loaded before "start": see child)
    clock = ClockReader(Path(spec.clock))
    log = HistoryWriter(Path(spec.log), spec.name, clock)
    log.write("start", failpoints=os.environ.get(ENV_VAR, ""))
    try:
        asyncio.run(_serve(spec, clock, log))
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
