"""jobledger for asyncio: the same ledger, with coroutines (CONTRACT section 7).

    import impl.aio

    async with impl.aio.open_store("jobs.sqlite") as store:
        job_id = await store.plan("fetch", {"url": url})
        await impl.aio.AsyncWorker(store, {"fetch": handler}).run(until_idle=True)

The blocking database work runs on each store's own thread, except PostgreSQL's hot path,
which runs natively on psycopg's async connections (:mod:`impl.aio.native`); handlers,
effect functions and doubt probes run on the event loop. Semantics, errors and results are the sync
store's, with one addition about cancellation (model/SEMANTICS.md, "Async face").
"""

from __future__ import annotations

from impl.aio.store import (
    AsyncArchiveFn,
    AsyncEffectFn,
    AsyncOnDoubt,
    AsyncProgressFn,
    AsyncStore,
    open_store,
)
from impl.aio.worker import AsyncHandler, AsyncJobContext, AsyncWorker

__all__ = [
    "AsyncArchiveFn",
    "AsyncEffectFn",
    "AsyncHandler",
    "AsyncJobContext",
    "AsyncOnDoubt",
    "AsyncProgressFn",
    "AsyncStore",
    "AsyncWorker",
    "open_store",
]
