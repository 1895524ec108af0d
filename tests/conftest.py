"""Shared fixtures: Hypothesis profiles, the manual clock, and one ``store`` fixture that
runs a test against every backend (the reference model, SQLite, PostgreSQL)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attrs
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

BACKENDS = [
    "memory",
    "sqlite",
    "sqlite-grouped",
    "postgres",
    "aio-memory",
    "aio-sqlite",
    "aio-postgres",
]
"""The sync stores, then the same through the async face (``impl.aio``, driven by
tests/aiosync.py's sync adapter on an event loop in debug mode). ``sqlite-grouped`` is
the SQLite store with its commits grouped (``sqlite_group_window``, impl.sqlite.group)."""

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


def _sqlite_factory(clock: ManualClock, path: Path, *, grouped: bool = False) -> StoreFactory:
    from impl.sqlite.store import SqliteStore

    def make(*, config: Config | None = None) -> Store:
        if grouped:
            config = attrs.evolve(config or Config(), sqlite_group_window=0.005)
        return SqliteStore(path, clock=clock, config=config)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    name: str = request.param
    if name.endswith("postgres"):
        from tests.pg import require_postgres

        require_postgres()
    return name


@pytest.fixture
def store_factory(backend: str, clock: ManualClock, tmp_path: Path) -> Iterator[StoreFactory]:
    """A factory that opens the backend under test on the shared manual clock.

    Calling it twice opens a second handle on the same database (for SQLite and
    PostgreSQL, a second connection; the model has one state, so the same object).
    An ``aio-`` backend is the same store behind the async face: each handle is an
    ``impl.aio`` store driven through tests/aiosync.py, and the test fails if the event
    loop was ever blocked.
    """
    if not backend.startswith("aio-"):
        yield from _sync_factory(backend, clock, tmp_path)
        return
    from impl.aio.store import AsyncStore
    from tests.aiosync import LoopThread, SyncFace

    base = backend.removeprefix("aio-")
    loop = LoopThread()
    faces: list[SyncFace] = []
    sync = _sync_factory(base, clock, tmp_path)
    inner = next(sync)
    try:

        def make(*, config: Config | None = None) -> Store:
            if base == "memory" and faces:  # the model has one state: one handle
                return faces[0]
            # The sync store opens on the async store's own thread, as in production.
            face = SyncFace(AsyncStore(lambda: cast(Any, inner(config=config))), loop)
            faces.append(face)
            return face

        yield make
        for face in faces:
            face.close()
        next(sync, None)
    finally:
        slow = loop.close()
    assert not slow, f"the async face blocked its event loop: {slow}"


def _sync_factory(backend: str, clock: ManualClock, tmp_path: Path) -> Iterator[StoreFactory]:
    if backend == "memory":
        single: list[Store] = []

        def make(*, config: Config | None = None) -> Store:
            if not single:
                single.append(MemoryStore(clock=clock, config=config))
            return single[0]

        yield make
        return
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if backend in ("sqlite", "sqlite-grouped"):
        inner = _sqlite_factory(
            clock, tmp_path / "jobs.sqlite", grouped=backend == "sqlite-grouped"
        )
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
