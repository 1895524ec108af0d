"""PostgreSQL test support: reachability check (loud in CI) and per-test schemas."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import attrs
import pytest

from model import Config, ManualClock, Store

PG_URL = os.environ.get("JOBLEDGER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _reachable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'jobledger[postgres]')"
    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {PG_URL} is unreachable: {exc}"
    return None


_STATUS: list[str | None] = []


def require_postgres() -> None:
    """Skip (outside CI) or fail (in CI) when PostgreSQL cannot be used."""
    if not _STATUS:
        _STATUS.append(_reachable())
    why = _STATUS[0]
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI requires PostgreSQL (.ci/run starts it)", pytrace=False)
    pytest.skip(f"{why}; start PostgreSQL on 127.0.0.1:5432 or set JOBLEDGER_TEST_PG")


def postgres_factory(clock: ManualClock) -> tuple[Callable[..., Store], Callable[[], None]]:
    """Return a factory opening stores in a fresh schema, and a cleanup dropping it."""
    import psycopg

    from impl.postgres.store import PostgresStore

    schema = f"t_{uuid.uuid4().hex[:16]}"

    def make(*, config: Config | None = None) -> Store:
        cfg = attrs.evolve(config if config is not None else Config(), postgres_schema=schema)
        return PostgresStore(PG_URL, clock=clock, config=cfg)

    def cleanup() -> None:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    return make, cleanup
