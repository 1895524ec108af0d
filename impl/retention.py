"""The retention service: prunes finished jobs on its own schedule.

``run_once()`` prunes the jobs that finished more than ``age`` seconds ago (store clock)
and returns the :class:`PruneReport`; ``run()`` is the thin loop around it, one pass at
once and then one every ``interval`` seconds until :meth:`stop`. A long-running
``jobledger worker`` runs it in a background thread when the configuration sets
``retention``, and :class:`impl.Reconciler` runs it between its passes when given one.
Safe beside workers and beside other pruners: each batch is a short transaction that
removes only the jobs still prunable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from model.config import RETENTION_INTERVAL_DEFAULT, Config
from model.errors import StorageError
from model.retention import PRUNE_BATCH_DEFAULT, PruneReport
from model.store import Store

log = logging.getLogger("jobledger.retention")


class Retention:
    """Prunes finished jobs older than ``age`` seconds every ``interval`` seconds.

    Args:
        store: the store to prune.
        age: seconds since a job finished after which it is pruned.
        interval: seconds between two passes of :meth:`run` (and :meth:`run_if_due`).
        keep_failed: keep jobs in their workflow's failed state.
        batch_size: jobs per prune transaction.
        monotonic: the schedule's clock (seconds); tests pass their own.
    """

    def __init__(
        self,
        store: Store,
        *,
        age: float,
        interval: float = RETENTION_INTERVAL_DEFAULT,
        keep_failed: bool = False,
        batch_size: int = PRUNE_BATCH_DEFAULT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.age = age
        self.interval = interval
        self.keep_failed = keep_failed
        self.batch_size = batch_size
        self._monotonic = monotonic
        self._next: float | None = None
        self._stop = threading.Event()

    @classmethod
    def from_config(cls, store: Store, config: Config) -> Retention | None:
        """The service the configuration asks for (``retention``, ``retention_interval``,
        ``retention_failed``), or None when ``retention`` is unset."""
        age = config.retention_age
        if age is None:
            return None
        return cls(
            store,
            age=age,
            interval=config.retention_interval,
            keep_failed=config.retention_failed == "keep",
        )

    def run_once(self) -> PruneReport:
        """One pass: prune the jobs that finished more than ``age`` seconds ago."""
        report = self.store.prune(
            finished_before=self.store.now() - self.age,
            keep_failed=self.keep_failed,
            batch_size=self.batch_size,
        )
        self._next = self._monotonic() + self.interval
        if report.jobs or report.forgotten:
            log.info("retention pruned %d job(s) in %d batch(es)", report.jobs, report.batches)
        return report

    def due(self) -> bool:
        """True when no pass ran yet, or the last one was ``interval`` seconds ago."""
        return self._next is None or self._monotonic() >= self._next

    def run_if_due(self) -> PruneReport | None:
        """Run a pass if one is due; None if not."""
        return self.run_once() if self.due() else None

    def run(self) -> None:
        """Prune now and then every ``interval`` seconds until :meth:`stop`; a pass that
        fails on storage is logged and tried again at the next interval."""
        while True:
            try:
                self.run_once()
            except StorageError as exc:
                log.warning("retention pass failed, retrying next interval: %s", exc)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        """Stop :meth:`run` after the current pass."""
        self._stop.set()
