"""The ledger's metrics, read from ``store.stats()`` each time Prometheus scrapes.

A custom collector rather than gauges kept up to date: the numbers belong to the
database, which every worker on every machine changes, so only a read at scrape time
is right. One scrape is one ``stats()`` call (one read transaction). When the read
fails, the scrape still answers, with ``jobledger_ledger_up 0`` and nothing else, so an
alert can say "the ledger cannot be read" instead of Prometheus seeing a dead target.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from model.breaker import BreakerMove, BreakerRow
from model.errors import JobledgerError
from model.record import Stats
from model.store import Store

log = logging.getLogger("jobledger.telemetry")

JOBS = "jobledger_jobs"
LEASES = "jobledger_leases"
IN_DOUBT = "jobledger_effects_in_doubt"
FAILED = "jobledger_failed_jobs"
QUEUE_LAG = "jobledger_queue_lag_seconds"
UP = "jobledger_ledger_up"
READ_SECONDS = "jobledger_stats_read_seconds"
BREAKERS = "jobledger_breakers"

BREAKER_STATES = ("open", "stale", "closed")
"""The ``state`` label of :data:`BREAKERS`: open, open but stale (its process stopped
asking the host), closed (in the last hour)."""


class LedgerCollector:
    """Collects the ledger's gauges from ``store.stats()`` at every scrape.

    Families:
        ``jobledger_jobs{kind,state}``: jobs by workflow and state, zero for every
        declared state; ``jobledger_leases{status="live"|"expired"}``: leases set (an
        expired one is waiting for a worker or ``reconcile`` to take it over);
        ``jobledger_effects_in_doubt``; ``jobledger_failed_jobs`` (in their workflow's
        failed state); ``jobledger_queue_lag_seconds``: age of the oldest eligible job,
        0 when none waits; ``jobledger_ledger_up``: 1 when the read worked;
        ``jobledger_stats_read_seconds``: how long the read took;
        ``jobledger_breakers{host,state}``: circuit breakers the download runs recorded
        (``store.breakers()``, the rows ``jobledger status`` shows), counted by host and
        state (open, stale, closed); each process has its own row for a host, so a
        count above 1 means several processes saw that host down.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        # Scrapes come on the HTTP server's threads; one read at a time is plenty.
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        """The families, without samples (so registering reads nothing)."""
        yield from self._families(None)
        yield _breaker_family([], 0.0)

    def collect(self) -> Iterator[Metric]:
        """Read ``store.stats()`` and yield the families."""
        started = time.perf_counter()
        now = 0.0
        with self._lock:
            try:
                stats: Stats | None = self.store.stats()
                now = self.store.now()
                breakers = [row for row in self.store.breakers() if row.shown(now)]
            except JobledgerError as exc:
                log.warning("metrics: cannot read the ledger's stats: %s", exc)
                stats = None
                breakers = []
        took = time.perf_counter() - started
        families = self._families(stats)
        if stats is not None:
            families.append(_breaker_family(breakers, now))
        if stats is None:
            families = [f for f in families if f.name in (UP, READ_SECONDS)]
        for family in families:
            if family.name == UP:
                family.add_metric([], 0.0 if stats is None else 1.0)
            elif family.name == READ_SECONDS:
                family.add_metric([], took)
        yield from families

    @staticmethod
    def _families(stats: Stats | None) -> list[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            JOBS, "Jobs by workflow (kind) and state.", labels=["kind", "state"]
        )
        leases = GaugeMetricFamily(
            LEASES,
            "Leases set, live or expired (an expired one awaits a worker or reconcile).",
            labels=["status"],
        )
        in_doubt = GaugeMetricFamily(
            IN_DOUBT, "Effects started under a lease that died before their result."
        )
        failed = GaugeMetricFamily(FAILED, "Jobs in their workflow's failed state.")
        lag = GaugeMetricFamily(
            QUEUE_LAG, "Seconds the oldest eligible job has waited; 0 when none waits."
        )
        up = GaugeMetricFamily(UP, "1 when the last scrape could read the ledger, else 0.")
        took = GaugeMetricFamily(READ_SECONDS, "Seconds the last scrape's stats read took.")
        if stats is not None:
            for kind in sorted(stats.by_state):
                for state, count in sorted(stats.by_state[kind].items()):
                    jobs.add_metric([kind, state], float(count))
            leases.add_metric(["live"], float(stats.leases_live))
            leases.add_metric(["expired"], float(stats.leases_expired))
            in_doubt.add_metric([], float(stats.in_doubt))
            failed.add_metric([], float(stats.failed))
            lag.add_metric([], float(stats.oldest_eligible_age or 0.0))
        return [jobs, leases, in_doubt, failed, lag, up, took]


def _breaker_family(rows: list[BreakerRow], now: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        BREAKERS,
        "Circuit breakers recorded by download runs, per host and state (open, stale: "
        "open but its process stopped asking, closed: in the last hour); one per process.",
        labels=["host", "state"],
    )
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        if row.state is BreakerMove.CLOSED:
            state = "closed"
        else:
            state = "stale" if row.stale(now) else "open"
        counts.setdefault(row.host, dict.fromkeys(BREAKER_STATES, 0))[state] += 1
    for host in sorted(counts):
        for state, count in counts[host].items():
            family.add_metric([host, state], float(count))
    return family
