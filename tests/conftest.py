"""Shared fixtures: Hypothesis profiles, the manual clock, and one ``store`` fixture that
runs a test against every backend (the reference model, SQLite, PostgreSQL)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from model import Config, ManualClock, MemoryStore, Store

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    print_blob=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    deadline=None,
    max_examples=5000,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

BACKENDS = ["memory", "sqlite", "postgres"]

StoreFactory = Callable[..., Store]


@pytest.fixture(scope="session", autouse=True)
def _drop_postgres_schemas() -> Iterator[None]:
    """Drop the PostgreSQL schemas this test process created (tests/pg.py reuses one)."""
    yield
    from tests.pg import drop_session_schemas

    drop_session_schemas()


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock that tests move by hand."""
    return ManualClock()


def _sqlite_factory(clock: ManualClock, path: Path) -> StoreFactory:
    from impl.sqlite.store import SqliteStore

    def make(*, config: Config | None = None) -> Store:
        return SqliteStore(path, clock=clock, config=config)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    name: str = request.param
    if name == "postgres":
        from tests.pg import require_postgres

        require_postgres()
    return name


@pytest.fixture
def store_factory(backend: str, clock: ManualClock, tmp_path: Path) -> Iterator[StoreFactory]:
    """A factory that opens the backend under test on the shared manual clock.

    Calling it twice opens a second handle on the same database (for SQLite and
    PostgreSQL, a second connection; the model has one state, so the same object).
    """
    if backend == "memory":
        single: list[Store] = []

        def make(*, config: Config | None = None) -> Store:
            if not single:
                single.append(MemoryStore(clock=clock, config=config))
            return single[0]

        yield make
        return
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if backend == "sqlite":
        inner = _sqlite_factory(clock, tmp_path / "jobs.sqlite")
    else:
        from tests.pg import postgres_factory

        inner, cleanup = postgres_factory(clock)
    opened: list[Store] = []

    def make_real(*, config: Config | None = None) -> Store:
        handle = inner(config=config)
        opened.append(handle)
        return handle

    yield make_real
    for handle in opened:
        handle.close()
    cleanup()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    """A fresh store of the backend under test, on the manual clock."""
    return store_factory()
