"""Effects on PostgreSQL: run ``fn`` at most once per recorded op key, record once.

``run_effect`` is split around the call of ``fn`` so that no transaction is open while
user code runs: one transaction checks the lease and records the start (or replays a
recorded result, or reports doubt), ``fn`` runs, and a second transaction records the
result fenced by the lease in the same statement. ``op_key`` is the primary key of the
``effects`` table and a ``done`` row is never updated again, so a result can never be
recorded twice, whatever crashes or reconnects happen in between.
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
from impl.postgres.rows import locked_job, plain
from impl.postgres.steps import Steps, Transaction
from model.config import Config
from model.effectstep import EffectSteps, Probe, RunFn, run_steps
from model.errors import (
    EffectInDoubt,
    EffectResultError,
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


@frozen
class _Begun:
    """What the start transaction decided: replay ``result``, probe ``doubt``, or run."""

    context: EffectContext
    replay: bool = False
    result: JSON = None
    doubt: DoubtInfo | None = None


EffectFlow = Generator["Transaction[Any] | RunFn | Probe", object, JSON]
"""``run_effect`` with its transactions yielded too (:meth:`EffectRunner.flow`)."""


@frozen
class EffectRunner:
    """Runs effects for one store against its database."""

    db: Database
    config: Config

    def run(
        self,
        lease: Lease,
        op: str,
        fn: EffectFn,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
    ) -> JSON:
        """``store.run_effect``: see :meth:`PostgresStore.run_effect`."""
        return run_steps(self.steps(lease, op, extras=extras, on_doubt=on_doubt), fn, on_doubt)

    def steps(
        self,
        lease: Lease,
        op: str,
        *,
        extras: Mapping[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
    ) -> EffectSteps:
        """``run_effect`` as durable steps (:mod:`model.effectstep`); each step is one
        transaction on a pooled connection, so any thread may drive any step."""
        return self._sync(self.flow(lease, op, extras=extras, on_doubt=on_doubt))

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
                    lambda: self._begin(lease, op, extras, on_doubt, probe=True),
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
                    lambda: self._record(lease, begun.context, text, probed=True),
                )
                return cast("JSON", recorded)
            begun = cast(
                _Begun,
                (
                    yield Transaction(
                        "effect_start",
                        lambda: self._begin(lease, op, extras, on_doubt, probe=False),
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
            "effect_record", lambda: self._record(lease, ctx, text, probed=False)
        )
        failpoint.hit("effect.after_record")
        return cast("JSON", out)

    def _begin(
        self,
        lease: Lease,
        op: str,
        extras: Mapping[str, Scalar] | None,
        on_doubt: OnDoubt,
        *,
        probe: bool,
    ) -> Steps[_Begun]:
        fast = yield from self._start_fast(lease, op, extras)
        if fast is not None:
            return fast
        lease, row = yield from locked_job(lease, "run_effect")
        job_id = row["job_id"]
        key = op_key(job_id, op, extras)
        ctx = EffectContext(
            job_id=job_id, op=op, op_key=key, token=row["token"], attempt=row["attempts"]
        )
        found = yield from steps.one(q.EFFECT_FOR_UPDATE, {"op_key": key})
        if found is not None and found["status"] == EffectStatus.DONE:
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
        self, lease: Lease, op: str, extras: Mapping[str, Scalar] | None
    ) -> Steps[_Begun | None]:
        """Record the first start of an op key in one statement; None when that is not it.

        None (the general code then decides, in the same transaction) when the lease or
        the arguments are not right, or when the op key already has a row: a recorded
        result to replay or a start in doubt.
        """
        if not plain(lease) or type(op) is not str:
            return None
        try:
            key = op_key(lease.job_id, op, extras)
            ext = canon(check_scalars(extras or {}, what="extras")).decode("utf-8")
        except (JobledgerError, ValueError, TypeError):
            return None  # the general code raises it, after the lease check as ever
        row = yield from steps.alone(
            q.EFFECT_START_NOW,
            {
                "job_id": lease.job_id,
                "token": lease.token,
                "op_key": key,
                "op": op,
                "extras": ext,
                "worker": lease.worker,
                "detail": json.dumps({"op": op}, sort_keys=True),
            },
        )
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
        yield from steps.logged(
            HistoryEvent(
                ctx.job_id,
                done["finished_at"],
                Event.EFFECT_RECORDED,
                lease.token,
                lease.worker,
                {"op": ctx.op},
            )
        )
        return True

    def _record(self, lease: Lease, ctx: EffectContext, text: str, *, probed: bool) -> Steps[JSON]:
        if not probed and plain(lease) and (yield from self._record_fast(lease, ctx, text)):
            return json.loads(text)  # type: ignore[no-any-return]
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
        return json.loads(text)  # type: ignore[no-any-return]

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
