"""Every stored value comes back exactly as it went in, on every read path, at its limits.

One value of one kind (an identity, a payload, an effect result, effect extras, a
``fail`` error text, a ``cancel`` reason) is written through the public API to a fresh
store of each backend, and to the reference model beside it. The model decides: if it
refuses the value, the backend must refuse it with the same error type; if it keeps it,
every read path of the backend must return it *exactly* (see :func:`tests.values.typed`:
``1.0`` stays a float, ``-0.0`` keeps its sign, payloads and results keep the model's key
order) and equal to what was written.

Read paths are entries of :data:`READ_PATHS`: a name, the kinds of value the path shows,
and a function from the :class:`Subject` (the store under test and how to reach its data
again) and the :class:`Written` value to a :class:`View` of what it read. To add a path
(the async face ``impl.aio``, an archive written by ``prune --archive``), add one entry.
Paths run in list order and may replace ``subject.store`` (the reopen does), so a path that
removes the job (an archive prune) goes last.

The limits are configuration, so each test runs at the default limits (1 MiB results,
nesting 128 deep) and at small ones (256 bytes, 6 deep) where the edges are cheap to hit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
from attrs import define, frozen
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from model import (
    Config,
    EffectContext,
    Event,
    JobledgerError,
    Lease,
    ManualClock,
    MemoryStore,
    Store,
    Workflow,
)
from tests.stateful.machine import projection
from tests.values import (
    error_texts,
    identities,
    nest,
    pad_to,
    payloads,
    results,
    size_of,
    typed,
)

FLOW = Workflow(
    name="values",
    states=["A", "B", "FAILED"],
    transitions=[("A", "B")],
    initial="A",
    terminal=["B"],
)
OP = "store-it"
SLOTS = ("identity", "payload", "result", "extras", "error", "reason")
ORDERED = frozenset({"payload", "result"})
"""Kinds of value whose mapping key order must match the model's (identities and extras
are keyed canonically, so their order carries no meaning)."""

DEFAULT = Config()
SMALL = Config(result_limit=256, json_depth_limit=6)
LIMITS = {"default": DEFAULT, "small": SMALL}

_PROFILE = settings()
VALUE_SETTINGS = settings(
    _PROFILE,
    # About 150 ms per example on PostgreSQL (an emptied schema, the command line, a
    # reopen), and there are 36 of these tests (6 kinds of value, 2 sets of limits, 3
    # backends): a sixth of the profile's examples keeps the ci run near half a minute,
    # and the explore profile scales it up.
    max_examples=max(6, _PROFILE.max_examples // 6),
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# -- the store under test ---------------------------------------------------------------


@define
class Subject:
    """The store under test and how to reach the same data again."""

    backend: str
    store: Store
    config: Config
    clock: ManualClock
    reopen: Callable[[], Store] | None
    """A new handle on the same data (None for the model, which has no disk)."""
    cli: list[str] | None
    """The command line's options that select this database (None for the model)."""
    target: str | None = None
    """What ``open_store`` opens (a path or URL; with ``config``, which names the
    PostgreSQL schema), for read paths that open the data their own way."""
    handles: list[Store] = attrs.field(factory=list)


@contextmanager
def open_subject(backend: str, config: Config, root: Path) -> Iterator[Subject]:
    """A fresh, empty store of ``backend`` with ``config``, closed afterwards."""
    clock = ManualClock()
    if backend == "memory":
        yield Subject(backend, MemoryStore(clock=clock, config=config), config, clock, None, None)
        return
    if backend == "sqlite":
        from impl.sqlite.store import SqliteStore

        root.mkdir(parents=True, exist_ok=True)
        path = root / "values.sqlite"

        def make() -> Store:
            return SqliteStore(path, clock=clock, config=config)

        first = make()
        cli = ["--db", str(path)]
    else:
        from tests.pg import PG_URL, postgres_factory

        # An emptied schema of this test process; its name is in the store's config.
        factory, _ = postgres_factory(clock)

        def make() -> Store:
            return factory(config=config)

        first = make()
        schema = first.config.postgres_schema  # type: ignore[attr-defined]
        cli = ["--db", PG_URL, "--set", f"postgres_schema={schema}"]
    target = cli[1]
    if backend == "postgres":
        config = first.config  # type: ignore[attr-defined]  # with the schema's name
    subject = Subject(backend, first, config, clock, make, cli, target, handles=[first])
    try:
        yield subject
    finally:
        for handle in subject.handles:
            handle.close()
        if backend == "sqlite":
            for leftover in root.glob("values.sqlite*"):
                leftover.unlink()


# -- writing one value ------------------------------------------------------------------


@frozen
class Written:
    """One value as written: where it went and what the write returned."""

    slot: str
    value: object
    job_id: str
    lease: Lease | None
    first: object
    """What ``run_effect`` returned when it recorded the value (result slot)."""


def _never(ctx: EffectContext) -> object:
    raise AssertionError(f"fn ran for the recorded op key {ctx.op_key}")


def write(store: Store, slot: str, value: object) -> Written:
    """Store ``value`` as a ``slot`` through the public API."""
    store.register(FLOW)
    identity = value if slot == "identity" else {"n": 1}
    payload = value if slot == "payload" else None
    job_id = store.plan(FLOW.name, identity, payload=payload)  # type: ignore[arg-type]
    if slot == "reason":
        store.cancel(job_id, value)  # type: ignore[arg-type]
        return Written(slot, value, job_id, None, None)
    lease = store.lease_next("w", kinds=[FLOW.name])
    assert lease is not None
    first: object = None
    if slot == "result":
        first = store.run_effect(lease, OP, lambda ctx: value)
    elif slot == "extras":
        store.run_effect(lease, OP, lambda ctx: 1, extras=value)  # type: ignore[arg-type]
    elif slot == "error":
        store.fail(lease, value, retryable=False)  # type: ignore[arg-type]
    return Written(slot, value, job_id, lease, first)


# -- reading it back --------------------------------------------------------------------


@frozen
class View:
    """What one read path showed of the job (fields it does not show stay empty)."""

    identity: list[object] = attrs.field(factory=list)
    payload: list[object] = attrs.field(factory=list)
    result: list[object] = attrs.field(factory=list)
    extras: list[object] = attrs.field(factory=list)
    error: list[object] = attrs.field(factory=list)
    reason: list[object] = attrs.field(factory=list)

    def of(self, slot: str) -> list[object]:
        found: list[object] = getattr(self, slot)
        return found


def _store_view(store: Store, job_id: str) -> View:
    info = store.job(job_id)
    effects = store.effects(job_id)
    history = store.history(job_id)
    return View(
        identity=[info.identity],
        payload=[info.payload],
        result=[e.result for e in effects],
        extras=[e.extras for e in effects],
        error=[info.last_error] + [h.detail["error"] for h in history if h.event is Event.FAILED],
        reason=[info.last_error]
        + [h.detail["reason"] for h in history if h.event is Event.CANCELLED],
    )


def read_api(subject: Subject, written: Written) -> View:
    """``job()``, ``effects()`` and ``history()`` of the handle that wrote."""
    return _store_view(subject.store, written.job_id)


def read_first_return(subject: Subject, written: Written) -> View:
    """What ``run_effect`` returned when it recorded the result."""
    return View(result=[written.first])


def read_replay(subject: Subject, written: Written) -> View:
    """``run_effect`` again for the recorded op: the stored result, ``fn`` not called."""
    assert written.lease is not None
    return View(result=[subject.store.run_effect(written.lease, OP, _never)])


def read_lease(subject: Subject, written: Written) -> View:
    """The identity and payload on the lease ``lease_next`` granted."""
    assert written.lease is not None
    return View(identity=[written.lease.identity], payload=[written.lease.payload])


def _command(subject: Subject, *args: str) -> object:
    """Run ``jobledger ARGS`` in process on the subject's database; its JSON output."""
    from impl.cli.main import cli

    assert subject.cli is not None
    env = {name: None for name in os.environ if name.startswith("JOBLEDGER_")}
    run = CliRunner().invoke(cli, [*subject.cli, *args], env=env, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)


def read_jobs_json(subject: Subject, written: Written) -> View:
    """``jobledger jobs --json``: the job's entry in the list."""
    listed = _command(subject, "jobs", "--json")
    assert isinstance(listed, list)
    (job,) = [j for j in listed if j["job_id"] == written.job_id]
    return View(
        identity=[job["identity"]],
        payload=[job["payload"]],
        error=[job["last_error"]],
        reason=[job["last_error"]],
    )


def read_show_json(subject: Subject, written: Written) -> View:
    """``jobledger show JOB_ID --json``, the real command run in process."""
    shown = _command(subject, "show", written.job_id, "--json")
    assert isinstance(shown, dict)
    events = [(h["event"], h["detail"]) for h in shown["history"]]
    return View(
        identity=[shown["identity"]],
        payload=[shown["payload"]],
        result=[e["result"] for e in shown["effects"]],
        extras=[e["extras"] for e in shown["effects"]],
        error=[shown["last_error"]] + [d["error"] for e, d in events if e == Event.FAILED.value],
        reason=[shown["last_error"]]
        + [d["reason"] for e, d in events if e == Event.CANCELLED.value],
    )


def read_reopened(subject: Subject, written: Written) -> View:
    """Close the store, open the database again, read everything and replay the result
    (the new handle serves the paths after this one)."""
    assert subject.reopen is not None
    subject.store.close()
    subject.store = subject.reopen()
    subject.handles.append(subject.store)
    view = _store_view(subject.store, written.job_id)
    if written.slot == "result":
        replayed = read_replay(subject, written).result
        view = attrs.evolve(view, result=view.result + replayed)
    return view


def read_async(subject: Subject, written: Written) -> View:
    """The async face (``impl.aio``) on the same data: job(), effects(), history(), and
    the recorded result replayed through an async ``run_effect``."""
    import asyncio

    import impl.aio

    assert subject.target is not None

    async def never(_ctx: EffectContext) -> None:
        raise AssertionError("fn ran for a recorded op key")

    async def read() -> View:
        async with impl.aio.open_store(
            subject.target, clock=subject.clock, config=subject.config
        ) as store:
            info = await store.job(written.job_id)
            effects = await store.effects(written.job_id)
            history = await store.history(written.job_id)
            replayed = []
            if written.slot == "result" and written.lease is not None:
                replayed = [await store.run_effect(written.lease, OP, never)]
        return View(
            identity=[info.identity],
            payload=[info.payload],
            result=[e.result for e in effects] + replayed,
            extras=[e.extras for e in effects],
            error=[info.last_error]
            + [h.detail["error"] for h in history if h.event is Event.FAILED],
            reason=[info.last_error]
            + [h.detail["reason"] for h in history if h.event is Event.CANCELLED],
        )

    return asyncio.run(read())


def read_archive(subject: Subject, written: Written) -> View:
    """``jobledger prune --archive FILE``: the job's line in the archive (what ``show
    --json`` printed). The job is cancelled first if it is not finished (prune removes
    finished jobs only), so this path shows no error text or reason, and it goes last:
    the job is gone afterwards."""
    store = subject.store
    flow = store.workflow(store.job(written.job_id).kind)
    if not flow.is_terminal(store.state(written.job_id)):
        store.cancel(written.job_id, "archived by the test")
    subject.clock.advance(1.0)
    archive = Path(os.environ.get("TMPDIR", "/tmp")) / f"values-archive-{os.getpid()}.jsonl"
    archive.unlink(missing_ok=True)
    try:
        # The prune runs on the wall clock, long after the manual clock's "now".
        _command(subject, "prune", "--finished-before", "0s", "--archive", str(archive), "--json")
        lines = [json.loads(line) for line in archive.read_text("utf-8").split("\n") if line]
    finally:
        archive.unlink(missing_ok=True)
    (shown,) = [j for j in lines if j["job_id"] == written.job_id]
    return View(
        identity=[shown["identity"]],
        payload=[shown["payload"]],
        result=[e["result"] for e in shown["effects"]],
        extras=[e["extras"] for e in shown["effects"]],
    )


@frozen
class ReadPath:
    """One way to read a stored value back."""

    name: str
    read: Callable[[Subject, Written], View]
    slots: frozenset[str]
    """The kinds of value the path shows (it must show at least one of each)."""
    needs_disk: bool = False
    """True when the model cannot take this path (it has no database to reach)."""


ALL = frozenset(SLOTS)
READ_PATHS: list[ReadPath] = [
    ReadPath("run_effect's first return", read_first_return, frozenset({"result"})),
    ReadPath("run_effect's replay", read_replay, frozenset({"result"})),
    ReadPath("lease_next's lease", read_lease, frozenset({"identity", "payload"})),
    ReadPath("job(), effects(), history()", read_api, ALL),
    ReadPath("show --json", read_show_json, ALL, needs_disk=True),
    ReadPath("jobs --json", read_jobs_json, ALL - {"result", "extras"}, needs_disk=True),
    ReadPath("after a reopen from disk", read_reopened, ALL, needs_disk=True),
    ReadPath("impl.aio", read_async, ALL, needs_disk=True),
    # Last: it removes the job.
    ReadPath(
        "prune --archive",
        read_archive,
        frozenset({"identity", "payload", "result", "extras"}),
        needs_disk=True,
    ),
]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """The sync backends only: the async face is one of the read paths above, on the
    same data, so every value written through a store is also read through it."""
    name: str = request.param
    if name == "postgres":
        from tests.pg import require_postgres

        require_postgres()
    return name


# -- the property -----------------------------------------------------------------------

Outcome = tuple[str, str]


def _attempt(store: Store, slot: str, value: object) -> tuple[Outcome, Written | None]:
    try:
        return ("ok", ""), write(store, slot, value)
    except JobledgerError as exc:
        return ("err", type(exc).__name__), None


def check_round_trip(subject: Subject, slot: str, value: object) -> Outcome:
    """The property: the model decides, the subject agrees on every read path.

    Returns the model's outcome (for the statistics)."""
    model = MemoryStore(clock=subject.clock, config=subject.config)
    expected, model_written = _attempt(model, slot, value)
    got, written = _attempt(subject.store, slot, value)
    assert got == expected, (
        f"{slot} {value!r:.200}: the model gave {expected}, {subject.backend} gave {got}"
    )
    job_ids = [j.job_id for j in model.jobs()]
    assert projection(subject.store, job_ids) == projection(model, job_ids)
    if written is None:
        return expected
    assert model_written is not None
    ordered = slot in ORDERED
    # The model keeps what was written (payloads and results come back in the canonical
    # key order, which is the only order difference allowed) ...
    reference = _store_view(model, model_written.job_id).of(slot)
    want = typed(value, ordered=False)
    assert reference, f"the model shows no {slot}"
    for shown in reference:
        assert typed(shown, ordered=False) == want, f"the model changed the {slot}"
    exact = typed(reference[0], ordered=ordered)
    # ... and the subject shows exactly what the model shows, on every path.
    for path in READ_PATHS:
        if slot not in path.slots or (path.needs_disk and subject.reopen is None):
            continue
        seen = path.read(subject, written).of(slot)
        assert seen, f"{path.name} shows no {slot}"
        for item in seen:
            assert typed(item, ordered=ordered) == exact, (
                f"{path.name} on {subject.backend} returned the {slot} changed: "
                f"{item!r:.300} instead of {reference[0]!r:.300}"
            )
    return expected


def values_for(slot: str, config: Config) -> st.SearchStrategy[object]:
    """The strategy for one kind of value at ``config``'s limits."""
    if slot in ("identity", "extras"):
        return identities()
    if slot in ("error", "reason"):
        return error_texts()
    if slot == "payload":
        return payloads(depth_limit=config.json_depth_limit)
    return results(limit=config.result_limit, depth_limit=config.json_depth_limit)


@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize("limits", sorted(LIMITS))
@VALUE_SETTINGS
@given(data=st.data())
def test_every_value_round_trips_exactly_or_is_refused_as_the_model_refuses(
    backend: str, limits: str, slot: str, tmp_path: Path, data: st.DataObject
) -> None:
    config = LIMITS[limits]
    value = data.draw(values_for(slot, config), label=slot)
    with open_subject(backend, config, tmp_path / "stores") as subject:
        outcome = check_round_trip(subject, slot, value)
    event(" ".join(outcome).strip())


# -- the edges, one by one ----------------------------------------------------------------


def _edges(config: Config) -> list[tuple[str, str, object, bool]]:
    """(name, slot, value, whether the model refuses it) for each edge of ``config``."""
    limit, depth = config.result_limit, config.json_depth_limit
    sized = [
        (f"result of {n} bytes", "result", pad_to(1.0, n), n > limit)
        for n in (limit - 1, limit, limit + 1)
    ]
    nested = [
        (f"{slot} {d} deep", slot, nest(-0.0, d, as_list=as_list), d > depth)
        for slot in ("payload", "result")
        for d in (depth - 1, depth, depth + 1)
        for as_list in (True, False)
    ]
    return sized + nested


@pytest.mark.parametrize("limits", sorted(LIMITS))
def test_values_at_the_configured_limits(backend: str, limits: str, tmp_path: Path) -> None:
    """One byte under, at and over the result limit; nesting one under, at and over the
    depth limit: the model keeps the first two and refuses the third, and so must all."""
    config = LIMITS[limits]
    for name, slot, value, refused in _edges(config):
        if slot == "result" and name.endswith("bytes"):
            assert f"of {size_of(value)} bytes" in name, "pad_to missed the size"
        outcome, _ = _attempt(MemoryStore(clock=ManualClock(), config=config), slot, value)
        assert (outcome[0] == "err") == refused, f"the model decided {outcome} for {name}"
        with open_subject(backend, config, tmp_path / "stores") as subject:
            check_round_trip(subject, slot, value)
