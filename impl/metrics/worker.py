"""A worker process's own metrics, fed by the worker's telemetry events.

:class:`impl.Worker` reports what it does through :func:`impl.telemetry.emit`
(``worker.counted`` with :class:`~impl.worker.RunReport`'s fields, ``worker.handled``,
``worker.effect``, ``worker.renewed``, ``worker.renewal_failed``, ``worker.failed``);
:class:`WorkerMetrics` is a telemetry listener that turns them into Prometheus counters
and histograms. The worker itself knows nothing of Prometheus, and with no listener
registered the events cost one check each.

One process, one set of numbers: every worker of the process (each ``concurrency``
thread) adds to the same families.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram

from impl import telemetry

DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
"""Seconds: jobs and effects range from a no-op to an hour-long download."""


class WorkerMetrics:
    """Counters and histograms of this process's workers, in ``registry``.

    Families (``jobledger_worker_...``): ``jobs_leased_total``, ``jobs_finished_total``
    (reached a terminal state), ``jobs_released_total`` (given back unfinished),
    ``jobs_failed_total`` (failed attempts: the handler raised or made no progress),
    ``retries_total`` (failed attempts that will run again after a backoff),
    ``lease_losses_total``, ``lease_renewals_total``, ``lease_renewal_errors_total``
    (a renewal the database refused for now; the next may land),
    ``handler_duration_seconds{kind}`` and ``effect_duration_seconds{kind,op}``.

    Call :meth:`install` to start listening and :meth:`uninstall` to stop.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(f"jobledger_worker_{name}", doc, registry=registry)

        self.leased = counter("jobs_leased", "Jobs this process's workers leased.")
        self.finished = counter("jobs_finished", "Jobs a handler brought to a terminal state.")
        self.released = counter("jobs_released", "Jobs given back unfinished (no attempt spent).")
        self.failed = counter(
            "jobs_failed", "Failed attempts: the handler raised or made no progress."
        )
        self.retries = counter("retries", "Failed attempts that will run again after a backoff.")
        self.lost = counter("lease_losses", "Leases lost while their job ran.")
        self.renewals = counter("lease_renewals", "Lease renewals by the background thread.")
        self.renewal_errors = counter(
            "lease_renewal_errors", "Lease renewals that failed on a storage error."
        )
        self.handler_seconds = Histogram(
            "jobledger_worker_handler_duration_seconds",
            "Seconds a handler ran, however it ended.",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.effect_seconds = Histogram(
            "jobledger_worker_effect_duration_seconds",
            "Seconds an effect took through ctx.effect, recording included (a replay is quick).",
            ["kind", "op"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._counted: Mapping[str, Counter] = {
            "jobs": self.leased,
            "finished": self.finished,
            "released": self.released,
            "failed": self.failed,
            "lost": self.lost,
        }

    def install(self) -> None:
        """Start counting the events of this process's workers."""
        telemetry.add_listener(self.on_event)

    def uninstall(self) -> None:
        """Stop counting."""
        telemetry.remove_listener(self.on_event)

    def on_event(self, event: telemetry.TelemetryEvent) -> None:
        """The telemetry listener: count one worker event (anything else is ignored)."""
        if not isinstance(event, dict):
            return
        name = event.get("event")
        if name == "worker.counted":
            for field, counter in self._counted.items():
                value = event.get(field)
                if isinstance(value, int) and value > 0:
                    counter.inc(value)
        elif name == "worker.handled":
            self.handler_seconds.labels(str(event["kind"])).observe(_seconds(event))
        elif name == "worker.effect":
            self.effect_seconds.labels(str(event["kind"]), str(event["op"])).observe(
                _seconds(event)
            )
        elif name == "worker.renewed":
            self.renewals.inc()
        elif name == "worker.renewal_failed":
            self.renewal_errors.inc()
        elif name == "worker.failed" and event.get("retry") is True:
            self.retries.inc()


def _seconds(event: Mapping[str, object]) -> float:
    value = event.get("seconds")
    return float(value) if isinstance(value, int | float) else 0.0
