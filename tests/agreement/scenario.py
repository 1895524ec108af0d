"""One deterministic scenario that reaches every failpoint, shared by the in-process
sweep and by the child processes that the SIGKILL sample starts.

``setup`` builds the same state on any store; ``OPERATIONS`` maps each failpoint's
operation to the call that reaches it; ``predict`` applies to the model what a crash at
a given failpoint leaves durable.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from attrs import define

from model import (
    Config,
    EffectContext,
    Lease,
    ManualClock,
    MemoryStore,
    Store,
    Workflow,
)

FLOW = Workflow(
    name="flow",
    states=["A", "B", "C", "FAILED"],
    transitions=[("A", "B"), ("B", "C")],
    initial="A",
    terminal=["C"],
)
OTHER = Workflow(
    name="other", states=["X", "Y"], transitions=[("X", "Y")], initial="X", terminal=["Y"]
)
CONFIG = Config(lease_ttl=10.0, max_attempts=3)
GROUPED = Config(lease_ttl=10.0, max_attempts=3, sqlite_group_window=0.005)
"""The same, for a SQLite store that groups its commits (impl.sqlite.group)."""
START = 1_000_000.0


@define
class World:
    """The state ``setup`` leaves: three jobs, a live lease, an expired one."""

    jobs: list[str]
    live: Lease


def setup(store: Store, clock: ManualClock) -> World:
    """J1 leased live, J2 leased and expired (with an effect started), J3 cancelled."""
    store.register(FLOW)
    jobs = store.plan_many("flow", [{"n": 1}, {"n": 2}, {"n": 3}])
    live = store.lease_next("w1")
    assert live is not None
    assert live.job_id == jobs[0]
    short = store.lease_next("w2", ttl=1.0)
    assert short is not None
    assert short.job_id == jobs[1]
    store.cancel(jobs[2], "set up for retry")
    clock.advance(2.0)
    return World(jobs=jobs, live=live)


def ok_fn(ctx: EffectContext) -> object:
    """An effect that succeeds."""
    return {"op": ctx.op, "token": ctx.token}


def raising_fn(ctx: EffectContext) -> object:
    """An effect that fails, so its start is removed."""
    raise RuntimeError("effect failed")


Call = Callable[[Store, World], object]

THEN = "B"
"""The ``then`` of the effect calls in the sweep's ``then=`` variant: J1's next state, so
the result transaction also carries the advance."""
EFFECT_OPERATIONS = ("effect_start", "effect_record", "effect_abort", "effect")
"""The operations whose failpoints a ``run_effect`` reaches."""


def operations(then: str | None = None) -> dict[str, Call]:
    """``OPERATIONS``, with ``then`` given to every ``run_effect``."""

    def effect(fn: Callable[[EffectContext], object]) -> Call:
        return lambda s, w: s.run_effect(w.live, "e", fn, then=then)

    return {
        **OPERATIONS,
        "effect_start": effect(ok_fn),
        "effect_record": effect(ok_fn),
        "effect_abort": effect(raising_fn),
        "effect": effect(ok_fn),
    }


OPERATIONS: dict[str, Call] = {
    "register": lambda s, w: s.register(OTHER),
    "plan": lambda s, w: s.plan("flow", {"n": 100}),
    "plan_many": lambda s, w: s.plan_many("flow", [{"n": 101}, {"n": 102}]),
    "lease_next": lambda s, w: s.lease_next("w3"),
    "renew": lambda s, w: s.renew(w.live),
    "release": lambda s, w: s.release(w.live),
    "advance": lambda s, w: s.advance(w.live, "B"),
    "fail": lambda s, w: s.fail(w.live, "boom"),
    "cancel": lambda s, w: s.cancel(w.jobs[0], "operator"),
    "retry": lambda s, w: s.retry(w.jobs[2]),
    "reconcile": lambda s, w: s.reconcile(),
    # J3 (cancelled in setup) is the one finished job; the archive makes the batch pass
    # prune.after_archive too.
    "prune": lambda s, w: s.prune(finished_before=s.now(), archive=lambda jobs: None),
    "effect_start": lambda s, w: s.run_effect(w.live, "e", ok_fn),
    "effect_record": lambda s, w: s.run_effect(w.live, "e", ok_fn),
    "effect_abort": lambda s, w: s.run_effect(w.live, "e", raising_fn),
    "effect": lambda s, w: s.run_effect(w.live, "e", ok_fn),
    # A grouped store's group failpoints, in a group of one: the advance's commit.
    "group": lambda s, w: s.advance(w.live, "B"),
    # A worker's ledger thread (impl.ledgerthread) around the call it makes: the advance.
    "ledger_thread": lambda s, w: s.advance(w.live, "B"),
    # The writers' queue (impl.sqlite.writers), held before the advance begins.
    "writers": lambda s, w: s.advance(w.live, "B"),
}


def operation_of(point: str) -> str:
    """The ``OPERATIONS`` key that reaches failpoint ``point``."""
    return point.split(".", 1)[0]


def predict(model: MemoryStore, world: World, point: str, then: str | None = None) -> None:
    """Apply to ``model`` what survives a crash at ``point`` (of a ``run_effect`` given
    ``then``, for the effect operations)."""
    op, where = point.split(".", 1)
    if op == "effect":
        if where == "after_record":
            model.run_effect(world.live, "e", ok_fn, then=then)
        else:  # after_start, before_record: the start is durable, no result
            model.begin_effect(world.live, "e", then=then)
        return
    if op in ("effect_record", "effect_abort"):
        if where == "after_commit":
            with contextlib.suppress(RuntimeError):
                operations(then)[op](model, world)
        else:
            model.begin_effect(world.live, "e", then=then)
        return
    if op == "writers":  # before BEGIN: nothing of the call is durable
        return
    if op == "ledger_thread":
        if where == "after_call":
            OPERATIONS[op](model, world)
        return
    if where == "after_commit":
        if op == "effect_start":
            model.begin_effect(world.live, "e", then=then)
        else:
            OPERATIONS[op](model, world)


def child_main(
    path: str, point: str, grouped: bool = False, ledger: bool = False, then: str | None = None
) -> None:
    """Run the scenario in this process against SQLite, dying at ``point``.

    The parent sets ``JOBLEDGER_FAILPOINTS`` to ``point=kill`` only for the final call,
    so setup runs unharmed: the failpoint is armed here after setup. ``grouped`` opens
    the store with :data:`GROUPED`; ``ledger`` makes the final call on a worker's
    ledger thread (impl.ledgerthread); ``then`` is given to the final ``run_effect``.
    """
    from impl import failpoint
    from impl.sqlite.store import SqliteStore

    clock = ManualClock(START)
    store = SqliteStore(Path(path), clock=clock, config=GROUPED if grouped else CONFIG)
    world = setup(store, clock)
    failpoint.arm(point, "kill")
    subject: Store = store
    if ledger:
        from impl.ledgerthread import LedgerThread, threaded

        subject = threaded(store, LedgerThread())
    with contextlib.suppress(RuntimeError):
        operations(then)[operation_of(point)](subject, world)
    sys.exit(3)  # reached only if the failpoint never fired


if __name__ == "__main__":
    child_main(
        sys.argv[1],
        sys.argv[2],
        grouped=sys.argv[3:] == ["grouped"],
        ledger=sys.argv[3:] == ["ledger"],
        then=THEN if sys.argv[3:] == ["then"] else None,
    )
