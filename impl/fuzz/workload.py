"""The fuzzed workload: a branching five-state workflow with five effects per job.

Each job fetches, splits into two parts, merges and publishes; the last effect's
recorded result decides between two terminal states, so a replay that saw a different
result than the one recorded would take the other branch. Every effect writes into the
fenced sink with the lease's token and returns an execution id that names the exact
execution whose result was recorded. Everything the handler does and sees goes to the
worker's history log.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence

from attrs import define, field

from impl.fuzz.history import HistoryWriter
from impl.fuzz.sink import FencedSink
from impl.worker import JobContext
from model.errors import JobledgerError, LeaseLost
from model.key import Scalar, op_key
from model.record import JSON, EffectContext
from model.workflow import Workflow

KIND = "fuzz"

WORKFLOW = Workflow(
    name=KIND,
    states=["NEW", "FETCHED", "SPLIT", "MERGED", "PUBLISHED", "ARCHIVED", "FAILED"],
    transitions=[
        ("NEW", "FETCHED"),
        ("FETCHED", "SPLIT"),
        ("SPLIT", "MERGED"),
        ("MERGED", "PUBLISHED"),
        ("MERGED", "ARCHIVED"),
    ],
    initial="NEW",
    terminal=["PUBLISHED", "ARCHIVED", "FAILED"],
    failed="FAILED",
)
"""The fuzzed workflow: NEW -> FETCHED -> SPLIT -> MERGED -> PUBLISHED | ARCHIVED."""

Step = tuple[str, Mapping[str, Scalar] | None]

STEPS: dict[str, tuple[Step, ...]] = {
    "NEW": (("fetch", None),),
    "FETCHED": (("part", {"n": 0}), ("part", {"n": 1})),
    "SPLIT": (("merge", None),),
    "MERGED": (("publish", None),),
}
"""The effects run in each non-terminal state before advancing."""

SUCCESS = frozenset({"PUBLISHED", "ARCHIVED"})

FIXED_NEXT: dict[str, str] = {"NEW": "FETCHED", "FETCHED": "SPLIT", "SPLIT": "MERGED"}
"""The states whose next state is known before their effects run: the last effect of
their step may enter it with its result (``then=``)."""
THEN_RATE = 0.5
"""How often such a step enters its next state with its last effect's result rather than
with an ``advance`` of its own (both paths stay in every run)."""


def step_then(state: str, rng: random.Random) -> str | None:
    """The ``then`` of the last effect of ``state``'s step, or None to advance apart."""
    target = FIXED_NEXT.get(state)
    return target if target is not None and rng.random() < THEN_RATE else None


def next_state(state: str, results: Sequence[JSON]) -> str:
    """Return where a job in ``state`` goes once its effects returned ``results``.

    From MERGED the branch is chosen by the recorded ``publish`` result, so every
    replay of the same recorded result chooses the same branch.
    """
    if state == "MERGED":
        result = results[0]
        exec_id = result.get("exec") if isinstance(result, dict) else None
        digest = hashlib.sha256(str(exec_id).encode()).digest()
        return "PUBLISHED" if digest[0] % 2 == 0 else "ARCHIVED"
    return FIXED_NEXT[state]


def all_steps() -> list[Step]:
    """Every effect a job runs on its way to a successful terminal state."""
    return [step for steps in STEPS.values() for step in steps]


class FencedOut(RuntimeError):
    """The sink rejected an execution's token: a newer lease already wrote there."""


@define
class Tools:
    """What the handler uses besides the job context: the sink, the log, randomness.

    Args:
        worker: the worker's name (also the lease holder's name).
        sink: the fenced sink the effects write into.
        log: the worker's history log.
        rng: this worker's seeded random source.
        pause: the longest pause inside an effect, in real seconds, which widens the
            windows in which a kill or a lease expiry lands mid-effect.
        yield_rate: how often the handler stops after one step (the worker then
            releases the job, giving the attempt back).
    """

    worker: str
    sink: FencedSink
    log: HistoryWriter
    rng: random.Random
    pause: float = 0.01
    yield_rate: float = 0.1
    _counter: itertools.count[int] = field(factory=itertools.count)

    def exec_id(self) -> str:
        """Return a new execution id, unique across the whole run."""
        return f"{self.worker}#{next(self._counter)}"


def sink_effect(tools: Tools, job_id: str, op: str) -> Callable[[EffectContext], JSON]:
    """Return the effect function: one fenced execution in the sink, with its id."""

    def fn(ectx: EffectContext) -> JSON:
        exec_id = tools.exec_id()
        tools.log.write(
            "exec", job=job_id, op=op, op_key=ectx.op_key, token=ectx.token, exec=exec_id
        )
        if tools.pause:
            time.sleep(tools.rng.random() * tools.pause)
        accepted = tools.sink.execute(
            job_id=job_id,
            op=op,
            op_key=ectx.op_key,
            token=ectx.token,
            exec_id=exec_id,
            worker=tools.worker,
        )
        tools.log.write(
            "sink", job=job_id, op_key=ectx.op_key, token=ectx.token, exec=exec_id, ok=accepted
        )
        if not accepted:
            raise FencedOut(f"the sink fenced out token {ectx.token} of job {job_id}")
        return {"exec": exec_id, "token": ectx.token}

    return fn


def run_step_effect(
    ctx: JobContext,
    tools: Tools,
    op: str,
    extras: Mapping[str, Scalar] | None,
    then: str | None = None,
) -> JSON:
    """Run one effect through the ledger (fenced, recorded once) and log its result."""
    token = ctx.lease.token
    result = ctx.effect(op, sink_effect(tools, ctx.job_id, op), extras=extras, then=then)
    tools.log.write(
        "result",
        job=ctx.job_id,
        op=op,
        op_key=op_key(ctx.job_id, op, extras),
        token=token,
        result=result,
    )
    return result


def make_handler(tools: Tools) -> Callable[[JobContext], None]:
    """Return the workflow's handler, logging every step into ``tools.log``."""

    def handler(ctx: JobContext) -> None:
        lease = ctx.lease
        log = tools.log
        log.write(
            "lease", job=lease.job_id, token=lease.token, attempt=lease.attempt, state=lease.state
        )
        try:
            payload = lease.payload if isinstance(lease.payload, dict) else {}
            if payload.get("flaky") and lease.attempt == 1:
                raise RuntimeError("a flaky job fails its first attempt on purpose")
            while not ctx.is_terminal():
                state = ctx.state
                steps = STEPS[state]
                then = step_then(state, tools.rng)
                # Looked up through the module so a test can swap in a broken wrapper.
                results = [
                    run_step_effect(ctx, tools, op, x, then if i == len(steps) - 1 else None)
                    for i, (op, x) in enumerate(steps)
                ]
                target = next_state(state, results)
                # With then, the last effect's call moved the job if the context moved.
                moved = ctx.state != state if then is not None else ctx.advance(target)
                log.write(
                    "advance",
                    job=lease.job_id,
                    token=lease.token,
                    frm=state,
                    to=target,
                    moved=moved,
                )
                if not ctx.is_terminal() and tools.rng.random() < tools.yield_rate:
                    log.write("yield", job=lease.job_id, token=lease.token, state=ctx.state)
                    return
            log.write("end", job=lease.job_id, token=lease.token, state=ctx.state)
        except LeaseLost as exc:
            log.write("lost", job=lease.job_id, token=lease.token, why=str(exc))
            raise
        except (JobledgerError, FencedOut, RuntimeError) as exc:
            log.write(
                "error", job=lease.job_id, token=lease.token, error=f"{type(exc).__name__}: {exc}"
            )
            raise

    return handler
