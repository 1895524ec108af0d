"""Fixtures for the PostgreSQL backend's own tests: a fresh schema per test, an
administrator connection, and stores opened in that schema."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql

from impl.postgres.store import PostgresStore
from model import Clock, Config
from tests.pg import PG_URL, require_postgres


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A schema name no other test uses; dropped (with everything in it) afterwards."""
    require_postgres()
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def pg_admin(pg_schema: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A separate autocommit connection for raw SQL, looking into the test's schema."""
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        yield conn


OpenStore = Callable[..., PostgresStore]


@pytest.fixture
def open_pg(pg_schema: str) -> Iterator[OpenStore]:
    """Open stores in the test's schema; every store opened is closed afterwards."""
    opened: list[PostgresStore] = []

    def make(
        *, clock: Clock | None = None, url: str = PG_URL, config: Config | None = None
    ) -> PostgresStore:
        cfg = config if config is not None else Config(postgres_schema=pg_schema)
        store = PostgresStore(url, clock=clock, config=cfg)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
