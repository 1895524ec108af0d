"""The async agreement machine: async tasks on one loop against the model.

Several logical workers run their calls as tasks on one event loop over an ``impl.aio``
store (SQLite); a worker's effect may sit inside ``fn`` (awaiting a gate) while the others
lease, advance, reconcile and run effects of their own, and an ``AsyncWorker`` runs one
job now and then, checked against the threaded ``Worker`` on the model with a twin
handler. Cancellations land at the awaits
where a crash can: before a call ran (nothing happens), while its durable step runs (the
step commits whole, the result is dropped), and inside ``fn`` (the start stays). The model
(``MemoryStore``) is told what each of those means (model/SEMANTICS.md, "Async face"), and
after every step the two projections must be equal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from impl.aio.store import AsyncStore
from impl.aio.worker import AsyncJobContext, AsyncWorker
from impl.sqlite.store import SqliteStore
from impl.worker import JobContext, Worker
from model import (
    Config,
    EffectContext,
    JobledgerError,
    Lease,
    ManualClock,
    MemoryStore,
    Store,
    job_key,
)
from model.memory import Started
from tests.loopwatch import LoopWatch
from tests.stateful.machine import FLOW, MAX_ATTEMPTS, TICKS, lease_view, outcome, projection

TTL = 3.0
AGENTS = ("a0", "a1", "a2")
OPS = ("e1", "e2")
STEP_CALLS = ("lease_next", "advance", "renew", "release", "fail", "effect")


class Fails(Exception):
    """What an effect's ``fn`` raises when the machine says so."""


class InFn:
    """A run_effect task of one agent, suspended inside ``fn`` at its gate."""

    def __init__(self, task: asyncio.Task[object], gate: asyncio.Future[object]) -> None:
        self.task = task
        self.gate = gate
        self.started: Started | None = None
        self.lease: Lease | None = None


class AsyncMachine(RuleBasedStateMachine):
    """Model and async store side by side; see the module doc."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        config = Config(max_attempts=MAX_ATTEMPTS, lease_ttl=TTL)
        self.model = MemoryStore(clock=self.clock, config=config)
        self.model.register(FLOW)
        self.dir = Path(__import__("tempfile").mkdtemp(prefix="aio-machine-"))
        path = self.dir / "jobs.sqlite"
        self.loop = asyncio.new_event_loop()
        self.watch = LoopWatch()
        self.watch.attach(self.loop)
        self.real = AsyncStore(lambda: SqliteStore(path, clock=self.clock, config=config))
        self.run(self.real.open())
        self.run(self.real.register(FLOW))
        self.leases: dict[str, tuple[Lease, Lease]] = {}  # agent -> (real, model)
        self.infn: dict[str, InFn] = {}
        self.job_ids: list[str] = []

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def settle(self) -> None:
        """Let every task run as far as it can without the machine's say."""
        for _ in range(3):
            self.run(asyncio.sleep(0))

    def both(
        self,
        real: Callable[[AsyncStore], Coroutine[Any, Any, object]],
        model: Callable[[Store], object],
    ) -> object:
        async def call() -> object:
            return await real(self.real)

        got = outcome(lambda: self.run(call()))
        want = outcome(lambda: model(self.model))
        assert (got[0], lease_view(got[1])) == (want[0], lease_view(want[1]))
        return got[1]

    def free(self, agent: str) -> bool:
        return agent not in self.infn

    @initialize(n=st.integers(1, 3))
    def setup(self, n: int) -> None:
        for i in range(n):
            jid = self.both(
                lambda s, i=i: s.plan("flow", {"n": i}), lambda s, i=i: s.plan("flow", {"n": i})
            )
            assert jid == job_key("flow", {"n": i})
            self.job_ids.append(str(jid))

    @rule(agent=st.sampled_from(AGENTS), ttl=st.sampled_from([None, 1.0, TTL]))
    def lease_next(self, agent: str, ttl: float | None) -> None:
        if not self.free(agent):
            return
        real = outcome(lambda: self.run(self.real.lease_next(agent, ttl=ttl)))
        want = outcome(lambda: self.model.lease_next(agent, ttl=ttl))
        assert (real[0], lease_view(real[1])) == (want[0], lease_view(want[1]))
        if isinstance(real[1], Lease) and isinstance(want[1], Lease):
            self.leases[agent] = (real[1], want[1])

    def _held(self, agent: str) -> tuple[Lease, Lease] | None:
        return self.leases.get(agent) if self.free(agent) else None

    @rule(agent=st.sampled_from(AGENTS), to=st.sampled_from(["A", "B", "C", "D", "Z"]))
    def advance(self, agent: str, to: str) -> None:
        held = self._held(agent)
        if held is not None:
            self.both(lambda s: s.advance(held[0], to), lambda s: s.advance(held[1], to))

    @rule(agent=st.sampled_from(AGENTS))
    def renew(self, agent: str) -> None:
        held = self._held(agent)
        if held is None:
            return
        real = outcome(lambda: self.run(self.real.renew(held[0])))
        want = outcome(lambda: self.model.renew(held[1]))
        assert (real[0], lease_view(real[1])) == (want[0], lease_view(want[1]))
        if isinstance(real[1], Lease) and isinstance(want[1], Lease):
            self.leases[agent] = (real[1], want[1])

    @rule(agent=st.sampled_from(AGENTS), delay=st.sampled_from([0.0, 2.0]))
    def release(self, agent: str, delay: float) -> None:
        held = self._held(agent)
        if held is not None:
            self.both(
                lambda s: s.release(held[0], delay=delay), lambda s: s.release(held[1], delay=delay)
            )

    @rule(agent=st.sampled_from(AGENTS), retryable=st.booleans())
    def fail(self, agent: str, retryable: bool) -> None:
        held = self._held(agent)
        if held is not None:
            self.both(
                lambda s: s.fail(held[0], "x", retryable=retryable),
                lambda s: s.fail(held[1], "x", retryable=retryable),
            )

    @rule(agent=st.sampled_from(AGENTS), op=st.sampled_from(OPS))
    def start_effect(self, agent: str, op: str) -> None:
        """Start an effect whose fn then waits at a gate: the agent is inside fn.
        An agent with no lease yet leases first, so effects start often."""
        if agent not in self.leases:
            self.lease_next(agent, None)
        held = self._held(agent)
        if held is None:
            return
        gate: asyncio.Future[object] = self.loop.create_future()
        entered = self.loop.create_future()

        async def fn(ctx: EffectContext) -> object:
            entered.set_result(None)
            return await gate

        task = self.loop.create_task(self.real.run_effect(held[0], op, fn))
        self.run(asyncio.wait([task, entered], return_when=asyncio.FIRST_COMPLETED))
        want = outcome(lambda: self.model.begin_effect(held[1], op))
        if task.done():  # replayed or refused: fn never ran
            got = outcome(task.result)
            if want[0] == "ok":
                assert isinstance(want[1], Started)
                assert want[1].replay
                assert got == ("ok", want[1].result)
            else:
                assert got == want
            return
        assert want[0] == "ok"
        assert isinstance(want[1], Started)
        assert not want[1].replay
        event("inside fn")
        entry = InFn(task, gate)
        entry.started, entry.lease = want[1], held[1]
        self.infn[agent] = entry

    @precondition(lambda self: bool(self.infn))
    @rule(data=st.data())
    def fn_returns(self, data: st.DataObject) -> None:
        self.end_fn(data.draw(st.sampled_from(sorted(self.infn))), "return")

    @precondition(lambda self: bool(self.infn))
    @rule(data=st.data())
    def fn_raises(self, data: st.DataObject) -> None:
        self.end_fn(data.draw(st.sampled_from(sorted(self.infn))), "raise")

    @precondition(lambda self: bool(self.infn))
    @rule(data=st.data())
    def fn_is_cancelled(self, data: st.DataObject) -> None:
        self.end_fn(data.draw(st.sampled_from(sorted(self.infn))), "cancel")

    @precondition(lambda self: bool(self.infn))
    @rule()
    def every_fn_is_cancelled(self) -> None:
        """The process dies: every task inside fn is cancelled at once."""
        for agent in sorted(self.infn):
            self.end_fn(agent, "cancel")

    def end_fn(self, agent: str, how: str) -> None:
        """An agent's fn returns, raises, or its task is cancelled there (a crash)."""
        entry = self.infn.pop(agent)
        assert entry.started is not None
        assert entry.lease is not None
        ctx = entry.started.context
        result = {"op": ctx.op, "token": ctx.token}
        if how == "return":
            entry.gate.set_result(result)
        elif how == "raise":
            entry.gate.set_exception(Fails("no"))
        else:
            entry.task.cancel()
        self.run(asyncio.wait([entry.task]))
        event(f"fn ended: {how}")
        if how == "cancel":
            assert entry.task.cancelled()
            return  # the start stays: the model was told begin_effect, nothing more
        got = outcome(entry.task.result) if how == "return" else None
        if how == "raise":
            assert isinstance(entry.task.exception(), Fails)
            self.model.abort_effect(ctx)
            return
        lease = entry.lease
        want = outcome(lambda: self.model.finish_effect(lease, ctx, result))
        assert got == want

    @rule(
        agent=st.sampled_from(AGENTS),
        call=st.sampled_from(STEP_CALLS),
        before=st.booleans(),
        op=st.sampled_from(OPS),
    )
    def cancel_in_a_step(self, agent: str, call: str, before: bool, op: str) -> None:
        """Cancel a call before it ran (nothing happens) or while its durable step runs
        (the step commits whole and the result is dropped)."""
        held = self._held(agent)
        if held is None:
            return
        real, model = held

        async def never(ctx: EffectContext) -> object:
            raise AssertionError("fn must not run: its start step was cancelled")

        calls: dict[str, tuple[Callable[[], Coroutine[Any, Any, object]], Callable[[], object]]] = {
            "lease_next": (
                lambda: self.real.lease_next(agent, ttl=TTL),
                lambda: self.model.lease_next(agent, ttl=TTL),
            ),
            "advance": (
                lambda: self.real.advance(real, "B"),
                lambda: self.model.advance(model, "B"),
            ),
            "renew": (lambda: self.real.renew(real), lambda: self.model.renew(model)),
            "release": (lambda: self.real.release(real), lambda: self.model.release(model)),
            "fail": (lambda: self.real.fail(real, "x"), lambda: self.model.fail(model, "x")),
            "effect": (
                lambda: self.real.run_effect(real, op, never),
                lambda: self.model.begin_effect(model, op),
            ),
        }
        make, tell_model = calls[call]
        task = self.loop.create_task(make())  # type: ignore[arg-type]
        if not before:
            self.run(asyncio.sleep(0))  # the task runs up to its step, handing it over
        task.cancel()
        self.run(asyncio.wait([task]))
        assert task.cancelled()
        if not before:
            outcome(tell_model)

    @rule(agent=st.sampled_from(AGENTS), does=st.sampled_from(["advance", "raise", "nothing"]))
    def a_worker_runs_one_job(self, agent: str, does: str) -> None:
        """An AsyncWorker's run_once on the real store, the threaded Worker's on the model,
        with twin handlers: the async runtime must end a job as the threaded one does."""

        async def afn(ctx: EffectContext) -> object:
            await asyncio.sleep(0)
            return {"op": ctx.op}

        async def ahandler(ctx: AsyncJobContext) -> None:
            await ctx.effect("e1", afn)
            if does == "raise":
                raise Fails("the handler failed")
            if does == "advance":
                await ctx.advance(sorted(FLOW.successors()[ctx.state])[0])

        def handler(ctx: JobContext) -> None:
            ctx.effect("e1", lambda c: {"op": c.op})
            if does == "raise":
                raise Fails("the handler failed")
            if does == "advance":
                ctx.advance(sorted(FLOW.successors()[ctx.state])[0])

        # No renewal fires inside one short handler on either side.
        aworker = AsyncWorker(self.real, {"flow": ahandler}, renew_every=3600.0)
        worker = Worker(self.model, {"flow": handler}, renew_every=3600.0)
        got = self.run(aworker.run_once(name=agent))
        want = worker.run_once(name=agent)
        assert got == want
        event(f"worker ran one: {does}" if got else "worker found nothing")

    @rule(dry=st.booleans())
    def reconcile(self, dry: bool) -> None:
        self.both(lambda s: s.reconcile(dry_run=dry), lambda s: s.reconcile(dry_run=dry))

    @rule(dt=st.sampled_from(TICKS))
    def tick(self, dt: float) -> None:
        self.clock.advance(dt)

    @invariant()
    def agree(self) -> None:
        want = projection(self.model, self.job_ids)
        got = self.run(self.real.call(lambda s: projection(s, self.job_ids)))
        assert got == want

    def teardown(self) -> None:
        for entry in self.infn.values():
            entry.task.cancel()
        for entry in self.infn.values():
            self.run(asyncio.wait([entry.task]))
        self.run(self.real.close())
        self.loop.close()
        blocked = self.watch.close()
        __import__("shutil").rmtree(self.dir, ignore_errors=True)
        assert not blocked, f"the event loop was blocked: {blocked}"


AsyncMachine.TestCase.settings = settings(
    settings(), max_examples=min(settings().max_examples, 80), stateful_step_count=40
)
TestAsyncMachine = AsyncMachine.TestCase

_ = JobledgerError  # the outcomes compare error type names
