"""The background checkpointer: it checkpoints on its own, and it never outlives its store."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest

from impl.sqlite.checkpoint import INTERVAL
from impl.sqlite.store import SqliteStore
from model import Config


def _checkpointers(path: Path) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"jobledger-checkpoint:{path.name}"]


def _db_size_grows_without_calls(path: Path, store: SqliteStore) -> bool:
    """Plan jobs, then watch the database file (not the WAL) while nothing is called."""
    # The store's own opening writes may be checkpointed any moment now: wait until the
    # file has kept its size for three intervals, so that a change below is the plan's.
    before, steady = path.stat().st_size, time.monotonic()
    while time.monotonic() - steady < 3 * INTERVAL:
        time.sleep(INTERVAL / 4)
        if path.stat().st_size != before:
            before, steady = path.stat().st_size, time.monotonic()
    store.plan_many("download", [{"url": f"https://example.org/{i}"} for i in range(300)])
    assert path.stat().st_size == before, "the commit went to the WAL, not the file"
    deadline = time.monotonic() + 10 * INTERVAL + 2.0
    while time.monotonic() < deadline:
        if path.stat().st_size > before:
            return True
        time.sleep(INTERVAL / 4)
    return False


def test_the_wal_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with SqliteStore(path) as store:
        assert len(_checkpointers(path)) == 1
        assert _db_size_grows_without_calls(path, store)


def test_with_synchronous_full_the_writers_checkpoint_themselves(tmp_path: Path) -> None:
    """FULL syncs every commit; a growing WAL would make each sync dearer (see module)."""
    path = tmp_path / "db.sqlite"
    with SqliteStore(path, config=Config(sqlite_synchronous="FULL")) as store:
        assert _checkpointers(path) == []
        assert not _db_size_grows_without_calls(path, store)


def test_close_stops_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path)
    store.plan("download", {"url": "u"})
    assert len(_checkpointers(path)) == 1
    store.close()
    assert _checkpointers(path) == []


def test_a_store_dropped_without_close_stops_its_thread(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = SqliteStore(path)
    store.plan("download", {"url": "u"})
    thread = _checkpointers(path)[0]
    del store
    gc.collect()
    thread.join(timeout=10.0)
    assert not thread.is_alive()


@pytest.mark.parametrize("synchronous", ["OFF", "NORMAL"])
def test_every_writer_keeps_a_high_autocheckpoint_as_a_backstop(
    tmp_path: Path, synchronous: str
) -> None:
    config = Config(sqlite_synchronous=synchronous)
    with SqliteStore(tmp_path / "db.sqlite", config=config) as store:
        conn = store._connection()
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10000
