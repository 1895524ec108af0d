"""A worker process's metrics: what its workers did, counted by the telemetry listener
and read back over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import impl
from impl.metrics import MetricsServer, WorkerMetrics, serve
from impl.sqlite.store import SqliteStore
from model import Config, Workflow

from .scrape import by_key, scrape

FLOW = Workflow("flow", ["A", "B", "C"], [("A", "B"), ("B", "C")], initial="A", terminal=["C"])


@pytest.fixture
def endpoint() -> Iterator[tuple[WorkerMetrics, MetricsServer]]:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.install()
    server = serve(registry, port=0)
    yield metrics, server
    metrics.uninstall()
    server.close()


class Permanent(Exception):
    retryable = False


def handler(ctx: impl.JobContext) -> None:
    what = ctx.identity["what"]
    if what == "finish":
        ctx.effect("fetch", lambda e: {"bytes": 10})
        ctx.effect("store", lambda e: {"ok": True})
        ctx.advance("B")
        ctx.advance("C")
    elif what == "half":
        # Progress without finishing: released; the next lease finishes it.
        ctx.advance("B" if ctx.state == "A" else "C")
    elif what == "slow":
        time.sleep(0.3)  # renewed every 0.05 s meanwhile
        ctx.advance("B")
        ctx.advance("C")
    elif what == "flaky":
        raise RuntimeError("try again later")  # attempts left: a retry after a backoff
    elif what == "broken":
        raise Permanent("404")  # permanent: into the failed state
    elif what == "cancelled":
        ctx.store.cancel(ctx.job_id, "operator stop")
        deadline = time.monotonic() + 10
        while not ctx._lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        ctx.advance("B")  # raises LeaseLost: the renewal found the lease gone


def test_the_worker_s_counts_and_durations_reach_the_endpoint(
    tmp_path: Path, endpoint: tuple[WorkerMetrics, MetricsServer]
) -> None:
    _, server = endpoint
    with SqliteStore(tmp_path / "j.sqlite", config=Config(backoff_base=60.0)) as store:
        store.register(FLOW)
        for what in ("finish", "half", "slow", "flaky", "broken", "cancelled"):
            store.plan("flow", {"what": what})
        worker = impl.Worker(store, {"flow": handler}, renew_every=0.05)
        report = worker.run(until_idle=True)
    got = by_key(scrape(server.url))

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    # "half" is leased twice: released after its advance, then finished.
    assert report.jobs == 7
    assert value("jobledger_worker_jobs_leased_total") == 7
    assert value("jobledger_worker_jobs_finished_total") == 3
    assert value("jobledger_worker_jobs_released_total") == 1
    assert value("jobledger_worker_jobs_failed_total") == 2  # flaky and broken
    assert value("jobledger_worker_retries_total") == 1  # flaky only
    assert value("jobledger_worker_lease_losses_total") == 1  # cancelled
    assert value("jobledger_worker_lease_renewals_total") >= 1
    assert value("jobledger_worker_lease_renewal_errors_total") == 0
    assert value("jobledger_worker_handler_duration_seconds_count", kind="flow") == 7
    assert value("jobledger_worker_effect_duration_seconds_count", kind="flow", op="fetch") == 1
    assert value("jobledger_worker_effect_duration_seconds_count", kind="flow", op="store") == 1
    assert value("jobledger_worker_handler_duration_seconds_bucket", kind="flow", le="+Inf") == 7


def test_an_uninstalled_listener_counts_nothing(
    tmp_path: Path, endpoint: tuple[WorkerMetrics, MetricsServer]
) -> None:
    metrics, server = endpoint
    metrics.uninstall()
    with SqliteStore(tmp_path / "j.sqlite") as store:
        store.register(FLOW)
        store.plan("flow", {"what": "finish"})
        impl.Worker(store, {"flow": handler}).run(until_idle=True)
    got = by_key(scrape(server.url))
    assert got[("jobledger_worker_jobs_leased_total", ())] == 0
