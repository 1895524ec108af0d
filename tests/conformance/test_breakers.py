"""Circuit breakers in the ledger: ``record_breaker``, ``breakers``, ``forget_breakers``.

Every backend keeps one row per ``(host, worker)``, overwritten on each open or close;
a close keeps when it last opened and its last error; times are the store's clock; a
second handle (another process) sees the rows; and rows changed before a cutoff go.
"""

from __future__ import annotations

import pytest

from model import BreakerMove, BreakerRow, InvalidInput, ManualClock, Store
from model.breaker import BREAKER_ERROR_LIMIT, BREAKER_RECENT_SECONDS, BREAKER_STALE_SECONDS
from tests.conftest import StoreFactory


def test_a_fresh_ledger_has_no_breakers(store: Store) -> None:
    assert store.breakers() == []


def test_open_then_close_keeps_one_row_with_its_history(store: Store, clock: ManualClock) -> None:
    start = clock()
    store.record_breaker(
        "a.example:443", worker="m1:10:0", state="open", failures=3,
        last_error="ConnectError: refused", cooldown=30.0,
    )  # fmt: skip
    assert store.breakers() == [
        BreakerRow(
            host="a.example:443",
            worker="m1:10:0",
            state=BreakerMove.OPEN,
            failures=3,
            last_error="ConnectError: refused",
            opened_at=start,
            until=start + 30.0,
            changed_at=start,
            opens=1,
        )
    ]
    clock.advance(31)
    store.record_breaker("a.example:443", worker="m1:10:0", state="closed", failures=0)
    (row,) = store.breakers()
    assert row == BreakerRow(
        host="a.example:443",
        worker="m1:10:0",
        state=BreakerMove.CLOSED,
        failures=0,
        last_error="ConnectError: refused",  # kept: why it was open
        opened_at=start,
        until=None,
        changed_at=start + 31,
        opens=1,
    )
    clock.advance(5)
    store.record_breaker(
        "a.example:443", worker="m1:10:0", state="open", failures=3,
        last_error="HTTP 503", cooldown=10.0,
    )  # fmt: skip
    (row,) = store.breakers()
    assert (row.state, row.opens, row.opened_at, row.until, row.last_error) == (
        BreakerMove.OPEN,
        2,
        start + 36,
        start + 46,
        "HTTP 503",
    )


def test_each_process_has_its_own_row_for_a_host_and_rows_sort_by_host_then_worker(
    store_factory: StoreFactory,
) -> None:
    one = store_factory()
    other = store_factory()  # another connection, as another process would have
    one.record_breaker("b:80", worker="m2:7:0", state="open", failures=2, cooldown=5.0)
    other.record_breaker("b:80", worker="m1:9:0", state="open", failures=4, cooldown=5.0)
    other.record_breaker("a:80", worker="m2:7:0", state="closed", failures=0)
    rows = one.breakers()
    assert [(r.host, r.worker, str(r.state), r.failures) for r in rows] == [
        ("a:80", "m2:7:0", "closed", 0),
        ("b:80", "m1:9:0", "open", 4),
        ("b:80", "m2:7:0", "open", 2),
    ]
    # A close never seen opened: no opened_at, no opens.
    assert (rows[0].opened_at, rows[0].opens, rows[0].last_error) == (None, 0, None)


def test_forget_breakers_removes_rows_changed_before_the_cutoff(
    store: Store, clock: ManualClock
) -> None:
    store.record_breaker("old:80", worker="w", state="open", failures=1, cooldown=1.0)
    clock.advance(100)
    store.record_breaker("new:80", worker="w", state="closed", failures=0)
    cut = clock() - 50
    assert store.forget_breakers(changed_before=cut) == 1
    assert [r.host for r in store.breakers()] == ["new:80"]
    assert store.forget_breakers(changed_before=cut) == 0
    # Changed exactly at the cutoff: kept (strictly before goes).
    assert store.forget_breakers(changed_before=clock()) == 0
    assert store.forget_breakers(changed_before=clock() + 1) == 1
    assert store.breakers() == []


def test_a_long_error_is_cut_and_bad_arguments_are_refused(store: Store) -> None:
    store.record_breaker(
        "h:1", worker="w", state="open", failures=1, last_error="x" * 5000, cooldown=1.0
    )
    (row,) = store.breakers()
    assert row.last_error == "x" * BREAKER_ERROR_LIMIT
    bad: list[dict[str, object]] = [
        {"state": "half_open", "failures": 1, "cooldown": 1.0},
        {"state": "open", "failures": 1},  # an open breaker needs its cool-down
        {"state": "open", "failures": 1, "cooldown": 0.0},
        {"state": "closed", "failures": 0, "cooldown": 1.0},
        {"state": "closed", "failures": -1},
        {"state": "closed", "failures": True},
    ]
    for options in bad:
        with pytest.raises(InvalidInput):
            store.record_breaker("h:1", worker="w", **options)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        store.record_breaker("", worker="w", state="closed", failures=0)
    with pytest.raises(InvalidInput):
        store.record_breaker("h:1", worker="w\x00", state="closed", failures=0)
    with pytest.raises(InvalidInput):
        store.forget_breakers(changed_before=float("nan"))
    assert store.breakers() == [row]  # nothing refused was written


def test_stale_and_shown_follow_the_store_clock(store: Store, clock: ManualClock) -> None:
    store.record_breaker("h:1", worker="w", state="open", failures=3, cooldown=30.0)
    (row,) = store.breakers()
    assert row.until is not None
    assert not row.stale(row.until + BREAKER_STALE_SECONDS)
    assert row.stale(row.until + BREAKER_STALE_SECONDS + 1)
    assert row.shown(row.until + 10 * BREAKER_RECENT_SECONDS)  # open rows always show
    store.record_breaker("h:1", worker="w", state="closed", failures=0)
    (closed,) = store.breakers()
    assert not closed.stale(closed.changed_at + 10 * BREAKER_RECENT_SECONDS)
    assert closed.shown(closed.changed_at + BREAKER_RECENT_SECONDS - 1)
    assert not closed.shown(closed.changed_at + BREAKER_RECENT_SECONDS)
