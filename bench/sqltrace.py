"""Where the SQLite backend's time goes, statement by statement (for ``--profile``).

cProfile shows one opaque ``Connection.execute`` line; this wraps the backend's
connections in a subclass that times every ``execute``/``executemany`` by its SQL text,
so a profile can say which statement (a COMMIT, a trigger-laden UPDATE, an index-heavy
INSERT) costs what. Only the benchmark process is patched, only for the call given.
"""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from impl.sqlite import connection as backend_connection


class _Timed(backend_connection.LedgerConnection):
    table: dict[str, list[float]]

    def execute(self, sql: str, params: Any = (), /) -> sqlite3.Cursor:
        start = time.perf_counter()
        try:
            return super().execute(sql, params)
        finally:
            _record(sql, time.perf_counter() - start)

    def executemany(self, sql: str, params: Iterable[Any], /) -> sqlite3.Cursor:
        start = time.perf_counter()
        try:
            return super().executemany(sql, params)
        finally:
            _record("[many] " + sql, time.perf_counter() - start)


_TABLE: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])


def _record(sql: str, seconds: float) -> None:
    entry = _TABLE[" ".join(sql.split())[:90]]
    entry[0] += 1
    entry[1] += seconds


def traced(open_store: Callable[[], Any], body: Callable[[Any], object], *, title: str) -> str:
    """Open a store with timed connections, run ``body(store)``; return a per-SQL table."""
    _TABLE.clear()
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        # The backend's own factory, timed (it carries the connection's wait limit).
        kwargs["factory"] = _Timed
        conn: sqlite3.Connection = real_connect(*args, **kwargs)
        return conn

    backend_connection.sqlite3.connect = connect  # type: ignore[attr-defined]
    try:
        store = open_store()
    finally:
        backend_connection.sqlite3.connect = real_connect  # type: ignore[attr-defined]
    try:
        _TABLE.clear()
        start = time.perf_counter()
        body(store)
        total = time.perf_counter() - start
    finally:
        store.close()
    rows = sorted(_TABLE.items(), key=lambda kv: -kv[1][1])
    in_sql = sum(v[1] for _, v in rows)
    lines = [
        f"\n--- SQL time: {title}: {total:.3f} s wall, {in_sql:.3f} s in SQLite "
        f"({100 * in_sql / total:.0f}%), {total - in_sql:.3f} s in Python ---",
        f"{'calls':>7} {'total s':>8} {'us/call':>8}  statement",
    ]
    for sql, (calls, seconds) in rows[:20]:
        lines.append(f"{int(calls):>7} {seconds:>8.3f} {1e6 * seconds / calls:>8.0f}  {sql}")
    return "\n".join(lines)
