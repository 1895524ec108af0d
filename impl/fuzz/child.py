"""A fuzz worker process: ``python -m impl.fuzz.child SPEC_JSON``.

It opens its own store on the shared database with the shared clock, its own history
log and its own connection to the sink, and runs an :class:`impl.Worker` over the fuzz
workflow until SIGTERM (or until a SIGKILL, from the parent or from a failpoint armed in
its environment through ``JOBLEDGER_FAILPOINTS``).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path

from attrs import asdict, evolve, frozen

from impl.failpoint import ENV_VAR
from impl.fuzz.clock import ClockReader
from impl.fuzz.history import HistoryWriter
from impl.fuzz.ledger import is_postgres
from impl.fuzz.sink import FencedSink
from impl.fuzz.workload import KIND, WORKFLOW, Tools, make_handler
from impl.store import open_store
from impl.worker import Worker
from model.config import Config
from model.errors import StorageError
from model.store import Store


@frozen(kw_only=True)
class ChildSpec:
    """Everything a worker process needs to know, passed as JSON on its command line."""

    name: str
    seed: int
    db: str
    sink: str
    clock: str
    log: str
    ttl: float
    renew_every: float
    idle_poll: float
    max_attempts: int
    backoff_base: float
    backoff_cap: float
    busy_timeout: float
    pause: float
    yield_rate: float
    schema: str | None = None
    concurrency: int = 1
    group_window: float = 0.0
    ledger_threads: int = 0

    def to_json(self) -> str:
        """Encode for the command line."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ChildSpec:
        """Decode from the command line."""
        data = json.loads(text)
        return cls(**data)

    def config(self) -> Config:
        """The store configuration every process of the run shares."""
        cfg = Config(
            lease_ttl=self.ttl,
            max_attempts=self.max_attempts,
            backoff_base=self.backoff_base,
            backoff_cap=self.backoff_cap,
            busy_timeout=self.busy_timeout,
            sqlite_group_window=self.group_window,
        )
        return cfg if self.schema is None else evolve(cfg, postgres_schema=self.schema)


ORPHAN_POLL = 0.5
OPEN_ATTEMPTS = 5
"""How often a worker tries to open the store before giving up (a server-side
disconnect can land on the migration check or the registration at start-up)."""


def _exit_when_orphaned(parent: int) -> None:
    # The parent owns the clock: without it the clock stops and nobody reaps this
    # process, so an orphan leaves at once instead of lingering.
    while True:
        time.sleep(ORPHAN_POLL)
        if os.getppid() != parent:
            os._exit(3)


def _open(spec: ChildSpec, clock: ClockReader, log: HistoryWriter) -> Store:
    # A real deployment restarts a worker that could not start; here the worker retries
    # itself, so a disconnect at start-up is survived rather than counted as a crash.
    attempt = 0
    while True:
        attempt += 1
        store: Store | None = None
        try:
            store = open_store(spec.db, clock=clock, config=spec.config())
            store.register(WORKFLOW)
            return store
        except StorageError as exc:
            log.write("open-failed", attempt=attempt, error=f"{type(exc).__name__}: {exc}")
            if store is not None:
                store.close()
            if attempt == OPEN_ATTEMPTS:
                raise
            time.sleep(0.05 * attempt)


def main(argv: list[str] | None = None) -> int:
    """Run one fuzz worker until stopped; return its exit status."""
    args = sys.argv[1:] if argv is None else argv
    threading.Thread(
        target=_exit_when_orphaned, args=(os.getppid(),), name="orphan-watch", daemon=True
    ).start()
    spec = ChildSpec.from_json(args[0])
    if is_postgres(spec.db):
        # Loaded before the start is logged: the parent times its kills from there, and
        # a kill inside the import of psycopg tests nothing.
        import impl.postgres.store  # noqa: F401, PLC0415
    clock = ClockReader(Path(spec.clock))
    log = HistoryWriter(Path(spec.log), spec.name, clock)
    log.write("start", failpoints=os.environ.get(ENV_VAR, ""))
    sink = FencedSink(Path(spec.sink))
    store = _open(spec, clock, log)
    try:
        tools = Tools(
            worker=spec.name,
            sink=sink,
            log=log,
            rng=random.Random(spec.seed),
            pause=spec.pause,
            yield_rate=spec.yield_rate,
        )
        worker = Worker(
            store,
            {KIND: make_handler(tools)},
            name=spec.name,
            ttl=spec.ttl,
            renew_every=spec.renew_every,
            idle_poll=spec.idle_poll,
            concurrency=spec.concurrency,
            ledger_threads=spec.ledger_threads,
        )
        report = worker.run()
        log.write("stop", jobs=report.jobs, finished=report.finished, lost=report.lost)
    finally:
        store.close()
        sink.close()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
