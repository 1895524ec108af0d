"""The reconciler: a maintenance service that runs ``store.reconcile()`` periodically
(and, given a :class:`~impl.retention.Retention`, prunes finished jobs when it is due).

``run_once()`` does one pass and returns its :class:`ReconcileReport`; ``run()`` is the
thin loop around it. Safe beside running workers: each pass is one transaction per
backend and only touches dead leases, their starts and exhausted jobs.
"""

from __future__ import annotations

import logging
import threading

from impl.retention import Retention
from model.errors import StorageError
from model.record import ReconcileReport
from model.store import Store

log = logging.getLogger("jobledger.reconcile")

RECONCILE_INTERVAL_DEFAULT = 10.0


class Reconciler:
    """Expires dead leases, surfaces in-doubt effects and fails exhausted jobs.

    Args:
        store: the store to reconcile.
        interval: seconds between passes in :meth:`run`.
        retention: prunes finished jobs on its own schedule between passes of :meth:`run`
            (see :meth:`impl.retention.Retention.from_config`); None for no pruning.
    """

    def __init__(
        self,
        store: Store,
        *,
        interval: float = RECONCILE_INTERVAL_DEFAULT,
        retention: Retention | None = None,
    ) -> None:
        self.store = store
        self.interval = interval
        self.retention = retention
        self._stop = threading.Event()

    def run_once(self, *, dry_run: bool = False) -> ReconcileReport:
        """One reconcile pass; with ``dry_run`` report what it would do, changing nothing."""
        report = self.store.reconcile(dry_run=dry_run)
        if report != ReconcileReport():
            log.info("reconcile%s: %s", " (dry run)" if dry_run else "", report)
        return report

    def run(self) -> None:
        """Reconcile every ``interval`` seconds until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                self.run_once()
                if self.retention is not None:
                    self.retention.run_if_due()
            except StorageError as exc:
                log.warning("reconcile pass failed, retrying next interval: %s", exc)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Stop :meth:`run` after the current pass."""
        self._stop.set()
