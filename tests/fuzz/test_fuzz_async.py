"""The multi-process crash fuzz with the async worker flavour: child processes running
``impl.aio.AsyncWorker`` (two handler tasks each on one loop), killed at random times
and at failpoints that land on the store's thread, respawned, drained, checked.

A short run keeps the default suite small; ``JOBLEDGER_FUZZ_SECONDS`` makes it longer and
``JOBLEDGER_FUZZ_SEED`` replays a seed. The broken-build test proves the check can fail on
this flavour too: the async effects' sink writes pass a stale token.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from impl.fuzz.engine import FuzzSettings, run_fuzz
from tests.fuzz.test_fuzz import _report, _seed

SECONDS = min(float(os.environ.get("JOBLEDGER_FUZZ_SECONDS", "8")), 600.0)
MIN_KILLS = 8
ASYNC_CHILD = "impl.fuzz.aiochild"


@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(2 * SECONDS + 300)
def test_async_worker_fuzz_history_is_clean(tmp_path: Path) -> None:
    seed = _seed()
    result = run_fuzz(
        tmp_path,
        FuzzSettings(
            seconds=SECONDS,
            seed=seed,
            workers=3,
            min_kills=MIN_KILLS,
            max_seconds=SECONDS + 30,
            child_module=ASYNC_CHILD,
        ),
    )
    rerun = (
        f"JOBLEDGER_FUZZ_SEED={seed} JOBLEDGER_FUZZ_SECONDS={SECONDS:g} python -m pytest "
        "-p no:cacheprovider tests/fuzz/test_fuzz_async.py"
    )
    text = _report(result, rerun)
    print(text)
    assert result.ok, text
    assert result.kills >= MIN_KILLS, text
    assert result.jobs > 0, text
    assert sum(result.by_state.values()) == result.jobs, text


@pytest.mark.postgres
@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(2 * SECONDS + 300)
def test_async_worker_fuzz_on_postgres_history_is_clean(tmp_path: Path) -> None:
    """The same on PostgreSQL, where the children's hot path runs natively on psycopg's
    async connections (impl.aio.native): kills land inside async transactions too."""
    from tests.pg import PG_URL, require_postgres

    require_postgres()
    seed = _seed()
    result = run_fuzz(
        tmp_path,
        FuzzSettings(
            seconds=SECONDS,
            seed=seed,
            workers=3,
            min_kills=MIN_KILLS,
            max_seconds=SECONDS + 30,
            child_module=ASYNC_CHILD,
            db=PG_URL,
        ),
    )
    rerun = (
        f"JOBLEDGER_FUZZ_SEED={seed} JOBLEDGER_FUZZ_SECONDS={SECONDS:g} python -m pytest "
        "-p no:cacheprovider tests/fuzz/test_fuzz_async.py::"
        "test_async_worker_fuzz_on_postgres_history_is_clean"
    )
    text = _report(result, rerun)
    print(text)
    assert result.ok, text
    assert result.kills >= MIN_KILLS, text
    assert result.jobs > 0, text
    assert sum(result.by_state.values()) == result.jobs, text
