"""The SQLite history is stored in three places (schema version 3) and read as one.

Entries of transactions that write the job's row go inline into it while its text is
short and into the history table after that; an effect's started and recorded entries
are read from the effect's own row, or from the history table once they were copied out
of it. These tests drive one job through each of those cases beside the model and
require the same history, entry for entry, and that each storage place was really used.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from impl.sqlite import queries as q
from impl.sqlite.store import SqliteStore
from model import EffectContext, Lease, ManualClock, MemoryStore, Workflow
from model.store import Store

FLOW = Workflow("flow", ("A", "B", "C"), (("A", "B"), ("B", "C")), "A", ("C",))


def _both(tmp_path: Path) -> tuple[ManualClock, MemoryStore, SqliteStore]:
    clock = ManualClock(100.0)
    model = MemoryStore(clock=clock)
    real = SqliteStore(tmp_path / "db.sqlite", clock=clock)
    for store in (model, real):
        store.register(FLOW)
    return clock, model, real


def _same_history(model: Store, real: Store, job_id: str) -> None:
    assert real.history(job_id) == model.history(job_id)
    assert real.effects(job_id) == model.effects(job_id)


def _places(real: SqliteStore, job_id: str) -> tuple[int, int, int]:
    """(inline entries, history-table rows, entries carried by effect rows)."""
    conn = real._connection()
    inline = conn.execute(q.SELECT_INLINE_HISTORY, (job_id,)).fetchone()[0]
    table = conn.execute("SELECT count(*) FROM history WHERE job_id = ?", (job_id,)).fetchone()
    carried = conn.execute(
        "SELECT count(start_n) + count(finish_n) FROM effects WHERE job_id = ?", (job_id,)
    ).fetchone()
    return len(inline.splitlines()), int(table[0]), int(carried[0])


def _each(stores: tuple[Store, Store], call: Callable[[Store], object]) -> list[object]:
    return [call(store) for store in stores]


def test_a_long_history_spills_to_the_table_and_reads_in_order(tmp_path: Path) -> None:
    clock, model, real = _both(tmp_path)
    with real:
        stores = (model, real)
        job_id = _each(stores, lambda s: s.plan("flow", {"n": 1}))[0]
        leases = _each(stores, lambda s: s.lease_next("w"))
        # Enough renewals that the inline text passes its limit.
        # A renewal line is at least 20 characters: this passes the limit at least once.
        for i in range(q.INLINE_HISTORY_LIMIT // 20 + 1):
            clock.advance(0.5)
            leases = [s.renew(lease) for s, lease in zip(stores, leases, strict=True)]
            if i % 7 == 0:
                for s, lease in zip(stores, leases, strict=True):
                    assert isinstance(lease, Lease)
                    s.run_effect(lease, f"op{i}", lambda _c, i=i: i)
        for s, lease in zip(stores, leases, strict=True):
            assert isinstance(lease, Lease)
            assert s.advance(lease, "B")
            s.run_effect(lease, "last", lambda _c: "done")
            assert s.advance(lease, "C")
        _same_history(model, real, job_id)
        inline, table, carried = _places(real, job_id)
        assert inline > 1, "entries inline"
        assert table > 1, "entries spilled to the history table"
        assert carried > 1, "entries carried by effect rows"


def test_advances_add_a_bounded_few_lines_and_the_next_check_spills_them(
    tmp_path: Path,
) -> None:
    """Advances do not check the inline text's length (a job takes each edge at most once
    between two claims); the next entry that checks, a renewal here, moves it out."""
    states = tuple(f"S{i:02}" for i in range(60))
    chain = Workflow("chain", states, tuple(pairwise(states)), states[0], (states[-1],))
    clock, model, real = _both(tmp_path)
    with real:
        stores = (model, real)
        for store in stores:
            store.register(chain)
        job_id = _each(stores, lambda s: s.plan("chain", {"n": 1}))[0]
        leases = _each(stores, lambda s: s.lease_next("w"))
        for state in states[1:-1]:
            clock.advance(0.5)
            for s, lease in zip(stores, leases, strict=True):
                assert isinstance(lease, Lease)
                assert s.advance(lease, state)
        inline, table, _ = _places(real, job_id)
        text = real._connection().execute(q.SELECT_INLINE_HISTORY, (job_id,)).fetchone()[0]
        assert (inline, table) == (len(states) - 1, 0), "every advance stayed inline"
        assert len(text) > q.INLINE_HISTORY_LIMIT
        leases = [s.renew(lease) for s, lease in zip(stores, leases, strict=True)]
        inline, table, _ = _places(real, job_id)
        assert (inline, table) == (0, len(states)), "the renewal moved them all out"
        for s, lease in zip(stores, leases, strict=True):
            assert s.advance(lease, states[-1])
        _same_history(model, real, job_id)


def test_entries_copied_out_of_effect_rows_keep_their_place(tmp_path: Path) -> None:
    """An abort, a retry after doubt and a probed result change the effect's row; its
    earlier entries move to the history table and keep their place in the order."""
    clock, model, real = _both(tmp_path)
    with real:
        stores = (model, real)
        job_id = _each(stores, lambda s: s.plan("flow", {"n": 2}))[0]
        leases = _each(stores, lambda s: s.lease_next("w1"))

        def boom(_ctx: EffectContext) -> object:
            raise RuntimeError("boom")

        for s, lease in zip(stores, leases, strict=True):
            assert isinstance(lease, Lease)
            with pytest.raises(RuntimeError):
                s.run_effect(lease, "aborted", boom)
        # A worker dies mid-effect: its start stays behind (begin without finish).
        model.begin_effect(leases[0], "retried")
        _start_only(real, leases[1], "retried")
        model.begin_effect(leases[0], "probed")
        _start_only(real, leases[1], "probed")
        clock.advance(1000.0)
        leases = _each(stores, lambda s: s.lease_next("w2"))
        for s, lease in zip(stores, leases, strict=True):
            assert isinstance(lease, Lease)
            assert s.run_effect(lease, "retried", lambda _c: "again") == "again"
            assert s.run_effect(lease, "probed", lambda _c: "never", on_doubt=lambda _i: 7) == 7
            assert s.advance(lease, "B")
        _same_history(model, real, job_id)
        _, table, _ = _places(real, job_id)
        assert table >= 3, "the aborted, retried and probed starts were copied out"


def _start_only(real: SqliteStore, lease: object, op: str) -> None:
    """Record an effect's start on SQLite and stop, as a worker killed in ``fn`` would."""

    class Killed(BaseException):
        pass

    def die(_ctx: EffectContext) -> object:
        raise Killed

    assert isinstance(lease, Lease)
    with pytest.raises(Killed):
        real.run_effect(lease, op, die)
    assert real._connection().execute(
        "SELECT count(*) FROM effects WHERE job_id = ? AND op = ? AND status = 'started'",
        (lease.job_id, op),
    ).fetchone() == (1,)


def test_the_planned_entry_is_implied_by_the_row_and_an_old_stored_one_is_not_doubled(
    tmp_path: Path,
) -> None:
    """Planning writes no history text (schema version 4): the PLANNED entry is the row's
    first entry at its creation time. A row planned by version 3, which wrote its PLANNED
    line inline, reads that one entry, not a second, implied one."""
    clock, model, real = _both(tmp_path)
    with real:
        new = _each((model, real), lambda s: s.plan("flow", {"n": 1}))[0]
        conn = real._connection()
        assert conn.execute(q.SELECT_INLINE_HISTORY, (new,)).fetchone() == ("", 1)
        _same_history(model, real, new)
        assert [(e.event.value, e.at) for e in real.history(new)] == [("planned", 100.0)]

        # A job as version 3 planned it: its PLANNED line inline, at another time.
        old = _each((model, real), lambda s: s.plan("flow", {"n": 2}))[0]
        conn.execute(
            "UPDATE jobs SET hist = ?, created_at = 1.0 WHERE job_id = ?",
            ('[100.0,"planned",0,null,{}]\n', old),
        )
        clock.advance(1.0)
        leases = _each((model, real), lambda s: s.lease_next("w"))
        assert [lease.job_id for lease in leases if isinstance(lease, Lease)] == [new, new]
        leases = _each((model, real), lambda s: s.lease_next("w"))
        for store, lease in zip((model, real), leases, strict=True):
            assert isinstance(lease, Lease)
            assert store.advance(lease, "B")
        _same_history(model, real, old)
        assert [e.event.value for e in real.history(old)] == ["planned", "leased", "advanced"]
