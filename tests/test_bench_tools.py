"""The benchmarks' profiling aids keep working as the backend changes.

``python -m bench --profile`` is how the hot paths were found; it once broke silently
when the SQLite backend began opening its connections with a factory of its own. No
timing is asserted here, only that the tools run against the real backend and report
what it did.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench import floor, ledger, sqltrace


def test_the_sql_trace_times_every_statement_of_a_lifecycle(tmp_path: Path) -> None:
    jobs = 5

    def fresh() -> ledger.SqliteStore:
        store = ledger.open_sqlite(tmp_path / "ledger.sqlite")
        store.plan_many(ledger.KIND, ledger.identities(jobs))
        return store

    table = sqltrace.traced(fresh, ledger.lifecycle, title="five jobs")

    calls = {
        sql: int(count)
        for count, sql in re.findall(r"^\s*(\d+)\s+[\d.]+\s+\d+\s+(.+)$", table, re.MULTILINE)
    }
    # Lease, effect start, effect result and advance: four transactions per job, and
    # one more lease_next that finds the queue empty.
    assert calls["COMMIT"] == 4 * jobs + 1
    assert calls["BEGIN IMMEDIATE"] == 4 * jobs + 1
    assert sum(n for sql, n in calls.items() if sql.startswith("INSERT INTO effects")) == jobs
    assert "five jobs" in table


def test_the_design_floor_writes_what_the_api_writes(tmp_path: Path) -> None:
    """The floor benchmark runs impl's own statements by hand: the ledger it leaves must
    read the same through the API as one the API's lifecycle left (so the floor measures
    the same work, and breaks loudly when a statement's parameters change)."""
    jobs = 4
    stores = [ledger.open_sqlite(tmp_path / f"{name}.sqlite") for name in ("api", "floor")]
    try:
        for store in stores:
            store.plan_many(ledger.KIND, ledger.identities(jobs))
        assert ledger.lifecycle(stores[0]) == (jobs, 0, 0)
        assert floor.lifecycle(stores[1]) == jobs

        def outcome(store: ledger.SqliteStore) -> list[object]:
            return [
                (
                    job.job_id,
                    job.state,
                    job.lease,
                    job.attempts,
                    [(e.event, e.token) for e in store.history(job.job_id)],
                    [(e.op, e.status, e.result, e.token) for e in store.effects(job.job_id)],
                )
                for job in store.jobs()
            ]

        assert outcome(stores[1]) == outcome(stores[0])
        assert {job.state for job in stores[1].jobs()} == {"DONE"}
    finally:
        for store in stores:
            store.close()
