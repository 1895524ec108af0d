"""The benchmarks' profiling aids keep working as the backend changes.

``python -m bench --profile`` is how the hot paths were found; it once broke silently
when the SQLite backend began opening its connections with a factory of its own. No
timing is asserted here, only that the tools run against the real backend and report
what it did.
"""

from __future__ import annotations

import re
from pathlib import Path

from bench import ledger, sqltrace


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
