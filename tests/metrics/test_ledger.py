"""The ledger's endpoint: what a scrape over HTTP says equals store.stats(), on every
backend; one gauge family for jobs by kind and state; an unreadable ledger is up 0."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from impl.metrics import LedgerCollector, MetricsServer, serve
from model import ManualClock, Store
from tests.conformance.flows import BRANCH, LINEAR, TTL, plan_and_lease, setup

from .scrape import by_key, scrape


@pytest.fixture
def endpoint(store: Store) -> Iterator[MetricsServer]:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(store))
    server = serve(registry, port=0)
    yield server
    server.close()


def test_a_scrape_reports_the_ledger_as_stats_sees_it(
    store: Store, clock: ManualClock, endpoint: MetricsServer
) -> None:
    setup(store, LINEAR, BRANCH)
    plan_and_lease(store, {"n": "dead"})  # its worker dies: the lease expires
    store.plan_many("linear", [{"n": "live"}, {"n": "live too"}])
    live = store.lease_next("w2", ttl=10 * TTL)
    assert live is not None
    assert store.lease_next("w3", ttl=10 * TTL) is not None
    store.run_effect(live, "send", lambda ctx: {"ok": True})
    failed = plan_and_lease(store, {"n": "broken"})
    store.fail(failed, "no such file", retryable=False)
    clock.advance(TTL + 5)
    store.plan("branch", {"n": 1})
    store.plan("linear", {"n": "waits"})
    clock.advance(7)

    got = by_key(scrape(endpoint.url))
    stats = store.stats()
    jobs = {
        (dict(labels)["kind"], dict(labels)["state"]): value
        for (name, labels), value in got.items()
        if name == "jobledger_jobs"
    }
    expected = {
        (kind, state): float(count)
        for kind, states in stats.by_state.items()
        for state, count in states.items()
    }
    assert jobs == expected
    assert jobs[("linear", "NEW")] == 4  # dead, the two live ones and waits
    assert jobs[("linear", "FAILED")] == 1
    assert jobs[("branch", "NEW")] == 1
    assert jobs[("branch", "LEFT")] == 0  # every declared state, zeros included
    assert got[("jobledger_leases", (("status", "live"),))] == 2
    assert got[("jobledger_leases", (("status", "expired"),))] == 1
    assert got[("jobledger_effects_in_doubt", ())] == stats.in_doubt == 0
    assert got[("jobledger_failed_jobs", ())] == 1
    # The dead job has waited since it was planned, TTL + 5 + 7 seconds ago.
    assert got[("jobledger_queue_lag_seconds", ())] == pytest.approx(TTL + 12)
    assert got[("jobledger_ledger_up", ())] == 1


def test_the_scrape_reads_the_ledger_anew_each_time(
    store: Store, clock: ManualClock, endpoint: MetricsServer
) -> None:
    setup(store)
    assert by_key(scrape(endpoint.url))[("jobledger_queue_lag_seconds", ())] == 0
    store.plan("linear", {"n": 1})
    clock.advance(3)
    got = by_key(scrape(endpoint.url))
    assert got[("jobledger_queue_lag_seconds", ())] == pytest.approx(3)
    assert got[("jobledger_jobs", (("kind", "linear"), ("state", "NEW")))] == 1


def test_an_unreadable_ledger_is_up_0_and_reports_nothing_else(
    store: Store, endpoint: MetricsServer
) -> None:
    setup(store)
    store.close()  # every read now raises StorageError
    got = by_key(scrape(endpoint.url))
    assert got[("jobledger_ledger_up", ())] == 0
    assert not [name for name, _ in got if name == "jobledger_jobs"]


def test_the_endpoint_binds_loopback_by_default(endpoint: MetricsServer) -> None:
    assert endpoint.host == "127.0.0.1"
    assert endpoint.url.startswith("http://127.0.0.1:")


def test_a_scrape_counts_the_recorded_breakers_by_host_and_state(
    store: Store, clock: ManualClock, endpoint: MetricsServer
) -> None:
    setup(store)
    assert not [k for k in by_key(scrape(endpoint.url)) if k[0] == "jobledger_breakers"]
    store.record_breaker("a:80", worker="p1", state="open", failures=3, cooldown=30.0)
    clock.advance(200)  # p1's probe was due 170 s ago: stale
    store.record_breaker("a:80", worker="p2", state="open", failures=3, cooldown=30.0)
    store.record_breaker("b:80", worker="p2", state="open", failures=3, cooldown=30.0)
    store.record_breaker("b:80", worker="p2", state="closed", failures=0)
    got = by_key(scrape(endpoint.url))
    breakers = {
        (dict(labels)["host"], dict(labels)["state"]): value
        for (name, labels), value in got.items()
        if name == "jobledger_breakers"
    }
    assert breakers == {
        ("a:80", "open"): 1,
        ("a:80", "stale"): 1,
        ("a:80", "closed"): 0,
        ("b:80", "open"): 0,
        ("b:80", "stale"): 0,
        ("b:80", "closed"): 1,
    }
