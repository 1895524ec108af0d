"""Effects on PostgreSQL: run ``fn`` at most once per recorded op key, record once.

``run_effect`` is split around the call of ``fn`` so that no transaction is open while
user code runs: one transaction checks the lease and records the start (or replays a
recorded result, or reports doubt), ``fn`` runs, and a second transaction records the
result fenced by the lease in the same statement. ``op_key`` is the primary key of the
``effects`` table and a ``done`` row is never updated again, so a result can never be
recorded twice, whatever crashes or reconnects happen in between.

``then`` (``advance(lease, then)`` in the transaction that records or replays the result)
is checked in the start transaction right after the lease, and taken in the record
transaction: in the common case (a fresh record, the job in the one state that can move
to ``then``) one statement records the result, takes the edge and writes both history
entries (``queries.EFFECT_RECORD_THEN_NOW``), so the pair costs one round trip.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Generator, Mapping
from typing import Any, cast

from attrs import frozen

from impl import failpoint
from impl.postgres import queries as q
from impl.postgres import steps
from impl.postgres.database import Database
from impl.postgres.edge import Edges, move, take
from impl.postgres.registry import Registry
from impl.postgres.rows import locked_job, plain
from impl.postgres.steps import Steps, Transaction
from model.config import Config
from model.effectstep import EffectSteps, Probe, RunFn, run_steps
from model.errors import (
    EffectInDoubt,
    EffectResultError,
    IllegalTransition,
    JobledgerError,
    LeaseLost,
    StorageError,
)
from model.key import Scalar, canon, check_scalars, op_key
from model.record import (
    JSON,
    DoubtInfo,
    EffectContext,
    EffectStatus,
    Event,
    HistoryEvent,
    Lease,
)
from model.store import EffectFn, OnDoubt
from model.validate import check_on_doubt, encode_result
from model.workflow import THEN, Workflow, edge_to


@frozen
class _Begun:
    """What the start transaction decided: replay ``result``, probe ``doubt``, or run."""

    context: EffectContext
    replay: bool = False
    result: JSON = None
    doubt: DoubtInfo | None = None


@frozen
class _Recorded:
    """What a record transaction committed: the result, and the refusal of ``then`` when
    ``advance`` would no longer take it (``fn`` moved the job meanwhile), to be raised
    once the result is committed, as ``run_effect`` and then ``advance`` would."""

    result: JSON
    refused: IllegalTransition | None = None

    def outcome(self) -> JSON:
        """The result, or the refusal raised."""
        if self.refused is not None:
            raise self.refused
        return self.result


EffectFlow = Generator["Transaction[Any] | RunFn | Probe", object, JSON]
"""``run_effect`` with its transactions yielded too (:meth:`EffectRunner.flow`)."""


@frozen
class EffectRunner:
    """Runs effects for one store against its database."""

    db: Database
    config: Config
    flows: Registry
    """The store's workflows (``then`` follows their edges)."""
    edges: Edges
    """The store's cache of what the one-statement moves need."""

    def run(
        self,
        lease: Lease,
        op: str,
        fn: EffectFn,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> JSON:
        """``store.run_effect``: see :meth:`PostgresStore.run_effect`."""
        return run_steps(
            self.steps(lease, op, extras=extras, on_doubt=on_doubt, then=then), fn, on_doubt
        )

    def steps(
        self,
        lease: Lease,
        op: str,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> EffectSteps:
        """``run_effect`` as durable steps (:mod:`model.effectstep`); each step is one
        transaction on a pooled connection, so any thread may drive any step."""
        return self._sync(self.flow(lease, op, extras=extras, on_doubt=on_doubt, then=then))

    def _sync(self, flow: EffectFlow) -> EffectSteps:
        """Run the flow's transactions here (blocking), hand its user code up."""
        reply: object = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    step = flow.throw(error) if error is not None else flow.send(reply)
                except StopIteration as stop:
                    done: JSON = stop.value
                    return done
                reply, error = None, None
                if isinstance(step, Transaction):
                    try:
                        reply = self.db.transact(step)
                    except BaseException as exc:  # raised in the flow, where it was asked
                        error = exc
                else:
                    try:
                        reply = yield step
                    except Exception as exc:  # fn's own exception (model.effectstep)
                        error = exc
        finally:
            flow.close()

    def flow(
        self,
        lease: Lease,
        op: str,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> EffectFlow:
        """``run_effect`` as a flow that yields its transactions too (as
        :class:`Transaction`, to be run and answered) besides the user code to run
        (:class:`RunFn`, :class:`Probe`): the sync store runs them blocking
        (:meth:`steps`), ``impl.aio`` awaits them on psycopg's async connections."""
        check_on_doubt(on_doubt)
        begun = cast(
            _Begun,
            (
                yield Transaction(
                    "effect_start",
                    lambda: self._begin(lease, op, extras, on_doubt, probe=True, then=then),
                )
            ),
        )
        if begun.doubt is not None and callable(on_doubt):
            # The probe is user code: it runs between transactions, never inside one.
            probed = yield Probe(begun.doubt)
            if probed is not None:
                text = encode_result(
                    probed,
                    limit=self.config.result_limit,
                    depth_limit=self.config.json_depth_limit,
                )
                recorded = yield Transaction(
                    "effect_record",
                    lambda: self._record(lease, begun.context, text, probed=True, then=then),
                )
                return cast(_Recorded, recorded).outcome()
            begun = cast(
                _Begun,
                (
                    yield Transaction(
                        "effect_start",
                        lambda: self._begin(lease, op, extras, on_doubt, probe=False, then=then),
                    )
                ),
            )
        if begun.replay:
            return begun.result
        ctx = begun.context
        failpoint.hit("effect.after_start")
        try:
            result = yield RunFn(ctx)
        except Exception:
            # The caller must see fn's own exception; a start we could not remove stays
            # behind and is reported in doubt once this lease is dead, which is safe.
            with contextlib.suppress(StorageError):
                yield Transaction("effect_abort", lambda: self._abort(ctx))
            raise
        failpoint.hit("effect.before_record")
        try:
            text = encode_result(
                result,
                limit=self.config.result_limit,
                depth_limit=self.config.json_depth_limit,
            )
        except EffectResultError:
            yield Transaction("effect_record", lambda: self._unrecordable(lease, ctx))
            raise
        out = yield Transaction(
            "effect_record", lambda: self._record(lease, ctx, text, probed=False, then=then)
        )
        failpoint.hit("effect.after_record")
        return cast(_Recorded, out).outcome()

    def _begin(
        self,
        lease: Lease,
        op: str,
        extras: Mapping[str, Scalar] | None,
        on_doubt: OnDoubt,
        *,
        probe: bool,
        then: str | None,
    ) -> Steps[_Begun]:
        fast = yield from self._start_fast(lease, op, extras, then)
        if fast is not None:
            return fast
        lease, row = yield from locked_job(lease, "run_effect")
        job_id = row["job_id"]
        edge: tuple[Workflow, str] | None = None
        if then is not None:
            # Checked first, before any argument or row of the effect: a move advance
            # would refuse writes nothing and runs nothing.
            flow = yield from self.flows.lookup(row["kind"])
            edge_to(flow, job_id, row["state"], then, asked=THEN)
            edge = (flow, then)
        key = op_key(job_id, op, extras)
        ctx = EffectContext(
            job_id=job_id, op=op, op_key=key, token=row["token"], attempt=row["attempts"]
        )
        found = yield from steps.one(q.EFFECT_FOR_UPDATE, {"op_key": key})
        if found is not None and found["status"] == EffectStatus.DONE:
            if edge is not None:
                yield from move(lease, row, *edge, asked=THEN)
            return _Begun(ctx, replay=True, result=json.loads(found["result"]))
        if found is not None:
            if on_doubt == "raise":
                raise EffectInDoubt(job_id, op, key, found["token"], found["started_by"])
            if probe and callable(on_doubt):
                doubt = DoubtInfo(
                    job_id=job_id,
                    op=op,
                    op_key=key,
                    started_at=found["started_at"],
                    started_token=found["token"],
                    started_by=found["started_by"],
                )
                return _Begun(ctx, doubt=doubt)
            yield from steps.log(
                job_id,
                Event.EFFECT_IN_DOUBT,
                token=row["token"],
                worker=lease.worker,
                detail={"op": op},
            )
        ext = canon(check_scalars(extras or {}, what="extras")).decode("utf-8")
        yield from steps.one(
            q.EFFECT_START,
            {
                "op_key": key,
                "job_id": job_id,
                "op": op,
                "extras": ext,
                "now": (yield from steps.now()),
                "token": row["token"],
                "worker": lease.worker,
            },
        )
        yield from steps.log(
            job_id,
            Event.EFFECT_STARTED,
            token=row["token"],
            worker=lease.worker,
            detail={"op": op},
        )
        return _Begun(ctx)

    def _start_fast(
        self, lease: Lease, op: str, extras: Mapping[str, Scalar] | None, then: str | None
    ) -> Steps[_Begun | None]:
        """Record the first start of an op key in one statement; None when that is not it.

        None (the general code then decides, in the same transaction) when the lease or
        the arguments are not right, when the op key already has a row (a recorded
        result to replay or a start in doubt), or, with ``then``, when the job is in no
        state from which ``advance`` would take or replay it (or its workflow is not yet
        known to this store).
        """
        if not plain(lease) or type(op) is not str:
            return None
        try:
            key = op_key(lease.job_id, op, extras)
            ext = canon(check_scalars(extras or {}, what="extras")).decode("utf-8")
        except (JobledgerError, ValueError, TypeError):
            return None  # the general code raises it, after the lease check as ever
        params: dict[str, object] = {
            "job_id": lease.job_id,
            "token": lease.token,
            "op_key": key,
            "op": op,
            "extras": ext,
            "worker": lease.worker,
            "detail": json.dumps({"op": op}, sort_keys=True),
        }
        query = q.EFFECT_START_NOW
        if then is not None:
            flow = self.flows.cached(lease.kind)
            legal = () if flow is None or type(then) is not str else self.edges.legal(flow, then)
            if flow is None or not legal:
                return None
            query = q.EFFECT_START_THEN_NOW
            params.update(kind=flow.name, states=list(legal))
        row = yield from steps.alone(query, params)
        if row is None or row["started_at"] is None:
            return None
        yield from steps.logged(
            HistoryEvent(
                lease.job_id,
                row["started_at"],
                Event.EFFECT_STARTED,
                row["token"],
                lease.worker,
                {"op": op},
            )
        )
        ctx = EffectContext(
            job_id=lease.job_id, op=op, op_key=key, token=row["token"], attempt=row["attempts"]
        )
        return _Begun(ctx)

    def _record_fast(self, lease: Lease, ctx: EffectContext, text: str) -> Steps[bool]:
        """Record the result, fenced, in one statement; False when the fence refused it."""
        done = yield from steps.alone(
            q.EFFECT_RECORD_NOW,
            {
                "job_id": ctx.job_id,
                "token": lease.token,
                "op_key": ctx.op_key,
                "result": text,
                "worker": lease.worker,
                "detail": json.dumps({"op": ctx.op}, sort_keys=True),
            },
        )
        if done is None:
            return False
        yield from steps.logged(_recorded(lease, ctx, done["finished_at"]))
        return True

    def _record_then_fast(
        self, lease: Lease, ctx: EffectContext, text: str, then: str
    ) -> Steps[bool]:
        """Record the result and take the one edge to ``then`` in one statement; False
        when the statement wrote nothing (the fence refused it, the job is not in the
        one state that moves to ``then``, the op is not open) or cannot be used."""
        flow = self.flows.cached(lease.kind)
        source = None if flow is None or type(then) is not str else self.edges.source(flow, then)
        if flow is None or source is None:
            return False
        edge = {"from": source, "to": then}
        done = yield from steps.alone(
            q.EFFECT_RECORD_THEN_NOW,
            {
                "job_id": ctx.job_id,
                "token": lease.token,
                "op_key": ctx.op_key,
                "result": text,
                "worker": lease.worker,
                "kind": flow.name,
                "from_state": source,
                "to_state": then,
                "ends": flow.is_terminal(then),
                "op_detail": json.dumps({"op": ctx.op}, sort_keys=True),
                "edge_detail": json.dumps(edge, sort_keys=True),
            },
        )
        if done is None:
            return False
        assert done["updated_at"] is not None, "the job row is locked by this statement"
        yield from steps.logged(_recorded(lease, ctx, done["finished_at"]))
        yield from steps.logged(
            HistoryEvent(
                ctx.job_id, done["updated_at"], Event.ADVANCED, lease.token, lease.worker, edge
            )
        )
        return True

    def _record(
        self, lease: Lease, ctx: EffectContext, text: str, *, probed: bool, then: str | None
    ) -> Steps[_Recorded]:
        if not probed and plain(lease):
            if then is None:
                fast = yield from self._record_fast(lease, ctx, text)
            else:
                fast = yield from self._record_then_fast(lease, ctx, text, then)
            if fast:
                return _Recorded(json.loads(text))
        lease, row = yield from locked_job(lease, "run_effect")
        if probed:
            yield from steps.log(
                ctx.job_id,
                Event.EFFECT_IN_DOUBT,
                token=row["token"],
                worker=lease.worker,
                detail={"op": ctx.op},
            )
        done = yield from steps.one(
            q.EFFECT_RECORD,
            {
                "op_key": ctx.op_key,
                "result": text,
                "now": (yield from steps.now()),
                "job_id": ctx.job_id,
                "token": row["token"],
            },
        )
        if done is None:
            # Only a holder of this same token could have recorded or removed it meanwhile.
            raise LeaseLost(ctx.job_id, lease.token, row["token"], "the effect was taken over")
        yield from steps.log(
            ctx.job_id,
            Event.EFFECT_RECORDED,
            token=row["token"],
            worker=lease.worker,
            detail={"op": ctx.op},
        )
        recorded = _Recorded(json.loads(text))
        if then is None:
            return recorded
        flow = yield from self.flows.lookup(row["kind"])
        try:
            moves = edge_to(flow, ctx.job_id, row["state"], then, asked=THEN)
        except IllegalTransition as exc:
            # The effect happened and its result is recorded: commit that, raise after.
            return _Recorded(recorded.result, refused=exc)
        if moves:
            yield from take(lease, row, flow, then, asked=THEN)
        return recorded

    def _unrecordable(self, lease: Lease, ctx: EffectContext) -> Steps[None]:
        marked = yield from steps.one(q.EFFECT_TO_DOUBT, {"op_key": ctx.op_key, "token": ctx.token})
        if marked is None:
            return
        job = yield from steps.one(q.JOB, {"job_id": ctx.job_id})
        assert job is not None
        yield from steps.log(
            ctx.job_id,
            Event.EFFECT_IN_DOUBT,
            token=job["token"],
            worker=lease.worker,
            detail={"op": ctx.op},
        )

    def _abort(self, ctx: EffectContext) -> Steps[int]:
        return (yield from steps.run(q.EFFECT_ABORT, {"op_key": ctx.op_key, "token": ctx.token}))


def _recorded(lease: Lease, ctx: EffectContext, at: float) -> HistoryEvent:
    """The ``effect_recorded`` entry a one-statement record wrote under ``lease``."""
    return HistoryEvent(
        ctx.job_id, at, Event.EFFECT_RECORDED, lease.token, lease.worker, {"op": ctx.op}
    )
