"""Lease times in the command's output are judged by the store's clock, not this machine's.

The ledger lives on a manual clock a million seconds after the epoch (1970), so any
"time left" computed with ``time.time()`` would be decades off and these tests fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from model import ManualClock, MemoryStore, Store
from tests.cli.conftest import Ledger, Outcome, populate


class _KeepOpen:
    """A store whose close does nothing, so one model serves several commands."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def close(self) -> None:
        pass


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_000_000.0)


@pytest.fixture
def model(clock: ManualClock, tmp_path: Path) -> tuple[Store, Ledger]:
    store = MemoryStore(clock=clock)
    return store, populate(store, clock, tmp_path / "unused")


@pytest.fixture
def cmd(run: Callable[..., Outcome], model: tuple[Store, Ledger]) -> Callable[..., Outcome]:
    keep = _KeepOpen(model[0])

    def invoke(*args: str) -> Outcome:
        return run("--db", "memory:", *args, obj=lambda _target, _config: keep)

    return invoke


def test_leases_json_counts_time_left_on_the_store_clock(
    cmd: Callable[..., Outcome], model: tuple[Store, Ledger], clock: ManualClock
) -> None:
    ledger = model[1]
    # populate granted the live lease for 3600 s, then moved the clock 50 s.
    rows = {row["job_id"]: row for row in json.loads(cmd("leases", "--json").out)}
    assert rows[ledger.live]["seconds_left"] == 3550.0
    assert rows[ledger.expired]["seconds_left"] == 0.0
    clock.advance(1000)
    rows = {row["job_id"]: row for row in json.loads(cmd("leases", "--json").out)}
    assert rows[ledger.live]["seconds_left"] == 2550.0


def test_leases_human_counts_time_left_on_the_store_clock(
    cmd: Callable[..., Outcome], clock: ManualClock
) -> None:
    out = cmd("leases")
    assert out.code == 0, out.err
    assert "59 min 10 s left" in out.out
    # The 10 s lease was granted 50 s ago.
    assert "expired 40.0 s ago" in out.out
    clock.advance(3600)
    out = cmd("leases")
    assert " s left" not in out.out
    assert "expired 50.0 s ago" in out.out
    assert "expired 1 h 0 min ago" in out.out


def test_show_counts_time_left_on_the_store_clock(
    cmd: Callable[..., Outcome], model: tuple[Store, Ledger], clock: ManualClock
) -> None:
    ledger = model[1]
    clock.advance(3000)
    out = cmd("show", ledger.live)
    assert out.code == 0, out.err
    assert "worker-1, token 1, 9 min 10 s left" in out.out
