"""Effects on SQLite: run a side effect at least once, record its result exactly once.

The start is committed before ``fn`` runs and the result is recorded, fenced by the
lease, in a second transaction after it returns; ``fn`` and doubt probes run with no
transaction open. A start whose lease died first leaves the op *in doubt*; what happens
then is the caller's ``on_doubt`` choice. Failpoints: ``effect_start.*`` around the start
transaction, ``effect.after_start``, ``effect.before_record``, ``effect_record.*`` around
the result transaction (and the in-doubt mark of an unrecordable result),
``effect.after_record``, and ``effect_abort.*`` around removing the start of an ``fn``
that raised.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping

from attrs import frozen

from impl import failpoint
from impl.sqlite import queries as q
from impl.sqlite.connection import write
from impl.sqlite.row import add_history, check_lease, require_job, text_of
from model.clock import Clock
from model.config import Config
from model.errors import (
    EffectInDoubt,
    EffectResultError,
    InvalidInput,
    LeaseLost,
    StorageError,
)
from model.key import Scalar, check_scalars, op_key
from model.record import JSON, DoubtInfo, EffectContext, Event, Lease
from model.store import EffectFn, OnDoubt
from model.validate import encode_result


@frozen
class _Op:
    job_id: str
    op: str
    key: str
    extras: str


@frozen
class _Started:
    op: _Op
    token: int
    attempt: int


@frozen
class _Recorded:
    op: _Op
    text: str


@frozen
class _Doubt:
    op: _Op
    info: DoubtInfo


def run_effect(
    conn: sqlite3.Connection,
    clock: Clock,
    config: Config,
    lease: Lease,
    op: str,
    *,
    fn: EffectFn,
    extras: Mapping[str, Scalar] | None,
    on_doubt: OnDoubt,
) -> JSON:
    """Run ``fn`` once per op key under ``lease`` and record its result (see module doc).

    Raises:
        LeaseLost: the lease is not live (at the start or when recording).
        EffectInDoubt: a dead lease's start is pending and ``on_doubt="raise"``.
        EffectResultError: ``fn`` (or the probe) returned something not recordable.
        InvalidInput: a bad ``on_doubt``; InvalidIdentity: bad ``op`` or ``extras``.
    """
    if not (on_doubt in ("retry", "raise") or callable(on_doubt)):
        raise InvalidInput(
            f"on_doubt must be 'retry', 'raise' or a callable probe, got {on_doubt!r}"
        )
    mode: OnDoubt = on_doubt
    while True:
        outcome = _start(conn, clock, lease, op, extras, mode=mode)
        if isinstance(outcome, _Recorded):
            return _decoded(outcome.text)
        the_op = outcome.op
        if isinstance(outcome, _Started):
            break
        assert callable(mode)
        probed = mode(outcome.info)
        if probed is not None:
            text = _encoded(probed, config, the_op, "the on_doubt probe")
            return _decoded(_record(conn, clock, lease, the_op, text, probed=True))
        # The probe found nothing done: run fn again, as "retry" would.
        mode = "retry"
    failpoint.hit("effect.after_start")
    key = the_op.key
    context = EffectContext(
        job_id=the_op.job_id, op=op, op_key=key, token=outcome.token, attempt=outcome.attempt
    )
    try:
        result = fn(context)
    except Exception:
        _abort(conn, clock, the_op, outcome.token)
        raise
    failpoint.hit("effect.before_record")
    try:
        text = _encoded(result, config, the_op, "fn")
    except EffectResultError:
        # The effect happened but its result cannot be kept: the start stays, in doubt.
        with write(conn, "effect_record", clock) as now:
            marked = conn.execute(
                q.MARK_START_IN_DOUBT, {"op_key": key, "token": outcome.token}
            ).rowcount
            if marked:
                add_history(
                    conn,
                    the_op.job_id,
                    now,
                    Event.EFFECT_IN_DOUBT,
                    require_job(conn, the_op.job_id).token,
                    worker=lease.worker,
                    detail={"op": op},
                )
        raise
    recorded = _record(conn, clock, lease, the_op, text, probed=False)
    failpoint.hit("effect.after_record")
    return _decoded(recorded)


def _start(
    conn: sqlite3.Connection,
    clock: Clock,
    lease: Lease,
    op: str,
    extras: Mapping[str, Scalar] | None,
    *,
    mode: OnDoubt,
) -> _Started | _Recorded | _Doubt:
    with write(conn, "effect_start", clock) as now:
        row = check_lease(conn, lease, now, "run_effect")
        key = op_key(row.job_id, op, extras)
        the_op = _Op(row.job_id, op, key, text_of(check_scalars(extras or {}, what="extras")))
        found = conn.execute(q.SELECT_EFFECT, (the_op.key,)).fetchone()
        if found is not None and found[4] == "done":
            return _Recorded(the_op, str(found[5]))
        params = {
            "op_key": the_op.key,
            "job_id": the_op.job_id,
            "op": the_op.op,
            "extras": the_op.extras,
            "now": now,
            "token": row.token,
            "worker": lease.worker,
        }
        if found is not None:
            info = DoubtInfo(
                job_id=the_op.job_id,
                op=the_op.op,
                op_key=the_op.key,
                started_at=float(found[6]),
                started_token=int(found[8]),
                started_by=str(found[9]),
            )
            if mode == "raise":
                raise EffectInDoubt(
                    info.job_id, info.op, info.op_key, info.started_token, info.started_by
                )
            if callable(mode):
                return _Doubt(the_op, info)
            add_history(
                conn,
                the_op.job_id,
                now,
                Event.EFFECT_IN_DOUBT,
                row.token,
                worker=lease.worker,
                detail={"op": the_op.op},
            )
            conn.execute(q.RESTART_EFFECT, params)
        else:
            conn.execute(q.INSERT_EFFECT_START, params)
        add_history(
            conn,
            the_op.job_id,
            now,
            Event.EFFECT_STARTED,
            row.token,
            worker=lease.worker,
            detail={"op": the_op.op},
        )
        return _Started(the_op, token=row.token, attempt=row.attempts)


def _record(
    conn: sqlite3.Connection, clock: Clock, lease: Lease, the_op: _Op, text: str, *, probed: bool
) -> str:
    """Record ``text`` as the op's result under a live lease; return the recorded text."""
    with write(conn, "effect_record", clock) as now:
        row = check_lease(conn, lease, now, "run_effect")
        params = {
            "op_key": the_op.key,
            "job_id": the_op.job_id,
            "op": the_op.op,
            "extras": the_op.extras,
            "result": text,
            "now": now,
            "token": row.token,
            "worker": lease.worker,
        }
        if conn.execute(q.RECORD_EFFECT, params).rowcount == 0:
            # Only a call under this same token could have recorded or removed the start
            # since: another handle of the lease took the effect over.
            raise LeaseLost(
                the_op.job_id, lease.token, row.token, "the effect was taken over", "run_effect"
            )
        if probed:
            add_history(
                conn,
                the_op.job_id,
                now,
                Event.EFFECT_IN_DOUBT,
                row.token,
                worker=lease.worker,
                detail={"op": the_op.op},
            )
        add_history(
            conn,
            the_op.job_id,
            now,
            Event.EFFECT_RECORDED,
            row.token,
            worker=lease.worker,
            detail={"op": the_op.op},
        )
    return text


def _abort(conn: sqlite3.Connection, clock: Clock, the_op: _Op, token: int) -> None:
    # fn raised: the caller knows it did not finish, so its start is withdrawn. If even
    # that fails the start stays and the op is merely in doubt; the caller's exception is
    # the one that matters, so a storage error here is not raised over it.
    try:
        with write(conn, "effect_abort", clock):
            conn.execute(q.DELETE_OWN_START, {"op_key": the_op.key, "token": token})
    except StorageError:
        pass


def _encoded(result: object, config: Config, the_op: _Op, source: str) -> str:
    # The model's encoder is the one definition of a recordable result (JSON, str keys,
    # no NaN, within the limit); the decision of what to do about it is made here.
    try:
        return encode_result(result, limit=config.result_limit)
    except EffectResultError as exc:
        why = str(exc)
    except RecursionError:
        why = "it is nested too deeply to encode"
    raise EffectResultError(
        f"effect {the_op.op!r} of job {the_op.job_id}: {source} returned a result that "
        f"cannot be recorded: {why}. The effect is now in doubt"
    )


def _decoded(text: str) -> JSON:
    value: JSON = json.loads(text)
    return value
