"""Effects on SQLite: run a side effect at least once, record its result exactly once.

The start is committed before ``fn`` runs and the result is recorded, fenced by the
lease, in a second transaction after it returns; ``fn`` and doubt probes run with no
transaction open. A start whose lease died first leaves the op *in doubt*; what happens
then is the caller's ``on_doubt`` choice. Failpoints: ``effect_start.*`` around the start
transaction, ``effect.after_start``, ``effect.before_record``, ``effect_record.*`` around
the result transaction (and the in-doubt mark of an unrecordable result),
``effect.after_record``, and ``effect_abort.*`` around removing the start of an ``fn``
that raised.

With ``then``, the start transaction also checks the move (before ``fn`` runs), a replay
takes it in the transaction that finds the result, and the result transaction takes it
after recording: ``effect_record.*`` then covers the result and the move together.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from attrs import frozen

from impl import failpoint
from impl.sqlite import queries as q
from impl.sqlite.advance import advance_in
from impl.sqlite.catalog import Catalog
from impl.sqlite.connection import LedgerConnection, Tx
from impl.sqlite.row import bindable, fence, fenceable, json_of, op_detail, text_of
from model.clock import Clock
from model.config import Config
from model.effectstep import EffectSteps, Probe, RunFn
from model.errors import (
    EffectInDoubt,
    EffectResultError,
    IllegalTransition,
    InvalidIdentity,
    InvalidInput,
    LeaseLost,
    StorageError,
)
from model.key import Scalar, check_scalars, op_key
from model.record import DoubtInfo, EffectContext, Event, Lease
from model.store import OnDoubt
from model.validate import encode_result
from model.workflow import THEN, edge_to

_STARTED = Event.EFFECT_STARTED.value
_RECORDED = Event.EFFECT_RECORDED.value
_IN_DOUBT = Event.EFFECT_IN_DOUBT.value
# The result of most effects, recorded without running the encoder.
_NULL = "null"
_NULL_SIZE = len(_NULL)


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


@frozen
class _Then:
    """A ``then`` checked in the start transaction: the job was in ``source``, and
    ``move`` says whether the edge to ``state`` is still to take (False: reached)."""

    state: str
    source: str
    move: bool


def effect_steps(
    conn: LedgerConnection,
    clock: Clock,
    config: Config,
    lease: Lease,
    op: str,
    *,
    catalog: Catalog,
    extras: Mapping[str, Scalar] | None,
    on_doubt: OnDoubt,
    then: str | None = None,
) -> EffectSteps:
    """``run_effect`` under ``lease`` as durable steps (see module doc and
    :mod:`model.effectstep`); every step runs on ``conn``, so in one thread.

    Raises:
        LeaseLost: the lease is not live (at the start or when recording).
        EffectInDoubt: a dead lease's start is pending and ``on_doubt="raise"``.
        EffectResultError: ``fn`` (or the probe) returned something not recordable.
        IllegalTransition: ``advance`` would refuse ``then`` (before ``fn`` runs; or after
            the result is recorded, if ``fn`` moved the job meanwhile).
        InvalidInput: a bad ``on_doubt``; InvalidIdentity: bad ``op`` or ``extras``.
    """
    if not (on_doubt in ("retry", "raise") or callable(on_doubt)):
        raise InvalidInput(
            f"on_doubt must be 'retry', 'raise' or a callable probe, got {on_doubt!r}"
        )
    mode: OnDoubt = on_doubt
    while True:
        outcome, checked = _start(
            conn, clock, lease, op, extras, catalog=catalog, mode=mode, then=then
        )
        if isinstance(outcome, _Recorded):
            return json_of(outcome.text)
        the_op = outcome.op
        if isinstance(outcome, _Started):
            break
        probed = yield Probe(outcome.info)
        if probed is not None:
            text = _encoded(probed, config, the_op, "the on_doubt probe")
            return json_of(
                _record(
                    conn, clock, lease, the_op, text, catalog=catalog, probed=True, then=checked
                )
            )
        # The probe found nothing done: run fn again, as "retry" would.
        mode = "retry"
    if failpoint.ARMED:
        failpoint.hit("effect.after_start")
    key = the_op.key
    context = EffectContext(
        job_id=the_op.job_id, op=op, op_key=key, token=outcome.token, attempt=outcome.attempt
    )
    try:
        result = yield RunFn(context)
    except Exception:
        _abort(conn, clock, the_op, outcome.token)
        raise
    if failpoint.ARMED:
        failpoint.hit("effect.before_record")
    try:
        if result is None and config.result_limit >= _NULL_SIZE:
            text = _NULL
        else:
            text = _encoded(result, config, the_op, "fn")
    except EffectResultError:
        # The effect happened but its result cannot be kept: the start stays, in doubt.
        with Tx(conn, "effect_record", clock) as tx:
            marked = conn.execute(
                q.MARK_START_IN_DOUBT,
                {"job_id": the_op.job_id, "op_key": key, "token": outcome.token},
            ).rowcount
            if marked:
                job_token = conn.execute(q.SELECT_FENCE, (the_op.job_id,)).fetchone()[0]
                tx.history(the_op.job_id, _IN_DOUBT, job_token, lease.worker, op_detail(op))
        raise
    recorded = _record(
        conn, clock, lease, the_op, text, catalog=catalog, probed=False, then=checked
    )
    if failpoint.ARMED:
        failpoint.hit("effect.after_record")
    return json_of(recorded)


def _start(
    conn: LedgerConnection,
    clock: Clock,
    lease: Lease,
    op: str,
    extras: Mapping[str, Scalar] | None,
    *,
    catalog: Catalog,
    mode: OnDoubt,
    then: str | None,
) -> tuple[_Started | _Recorded | _Doubt, _Then | None]:
    with Tx(conn, "effect_start", clock) as tx:
        checked = None if then is None else _check_then(conn, tx, catalog, lease, then)
        outcome = _start_in(conn, tx, lease, op, extras, mode=mode)
        if isinstance(outcome, _Recorded) and checked is not None and checked.move:
            advance_in(
                conn, tx, catalog, lease, checked.state, asked=THEN, from_state=checked.source
            )
        return outcome, checked


def _check_then(conn: LedgerConnection, tx: Tx, catalog: Catalog, lease: Lease, then: str) -> _Then:
    """Check ``then`` as ``advance`` would, before anything else is decided or written."""
    state, kind = fence(conn, lease, tx.now, "run_effect")[5:]
    workflow = catalog.get(conn, kind)
    passed = catalog.ancestors(workflow)[state]
    move = edge_to(workflow, lease.job_id, state, then, passed=passed, asked=THEN)
    return _Then(state=then, source=state, move=move)


def _start_in(
    conn: LedgerConnection,
    tx: Tx,
    lease: Lease,
    op: str,
    extras: Mapping[str, Scalar] | None,
    *,
    mode: OnDoubt,
) -> _Started | _Recorded | _Doubt:
    # The usual case first, before any read: no row yet and the lease live, so the
    # start is one fenced insert, which also checks the lease's attempt (a caller's
    # Lease object may say anything; the general path then reads the job's). A bad
    # op or extras leaves the decision to the general path below, which checks the
    # lease first, as the model does.
    tried: int | None = None  # the attempt a fenced insert was tried with
    if fenceable(lease) and bindable(lease.attempt):
        try:
            the_op = _op_of(lease.job_id, op, extras)
        except InvalidIdentity:
            pass
        else:
            tried = lease.attempt
            if _insert_start(
                conn, tx, the_op, token=lease.token, worker=lease.worker, attempt=tried
            ):
                return _Started(the_op, token=lease.token, attempt=tried)
    token, _, _, attempt, _, _, _ = fence(conn, lease, tx.now, "run_effect")
    the_op = _op_of(lease.job_id, op, extras)
    if tried != attempt and _insert_start(
        conn, tx, the_op, token=token, worker=lease.worker, attempt=attempt
    ):
        return _Started(the_op, token=token, attempt=attempt)
    job_id, key = the_op.job_id, the_op.key
    found = conn.execute(q.SELECT_EFFECT, (job_id, key)).fetchone()
    if found[4] == "done":
        return _Recorded(the_op, str(found[5]))
    info = DoubtInfo(
        job_id=job_id,
        op=op,
        op_key=key,
        started_at=float(found[6]),
        started_token=int(found[8]),
        started_by=str(found[9]),
    )
    if mode == "raise":
        raise EffectInDoubt(info.job_id, info.op, info.op_key, info.started_token, info.started_by)
    if callable(mode):
        return _Doubt(the_op, info)
    tx.history(job_id, _IN_DOUBT, token, lease.worker, op_detail(op))
    _copy_entries_out(conn, the_op)
    conn.execute(
        q.RESTART_EFFECT,
        _start_params(tx, the_op, token=token, worker=lease.worker, attempt=attempt),
    )
    tx.history(job_id, _STARTED, token, lease.worker, op_detail(op))
    return _Started(the_op, token=token, attempt=attempt)


def _op_of(job_id: str, op: str, extras: Mapping[str, Scalar] | None) -> _Op:
    """The op's key and extras text; ``InvalidIdentity`` for a bad op or extras."""
    key = op_key(job_id, op, extras)
    extras_text = text_of(check_scalars(extras, what="extras")) if extras else "{}"
    return _Op(job_id, op, key, extras_text)


def _start_params(
    tx: Tx, the_op: _Op, *, token: int, worker: str, attempt: int
) -> dict[str, object]:
    return {
        "op_key": the_op.key,
        "job_id": the_op.job_id,
        "op": the_op.op,
        "extras": the_op.extras,
        "now": tx.now,
        "token": token,
        "worker": worker,
        "attempt": attempt,
    }


def _insert_start(
    conn: sqlite3.Connection, tx: Tx, the_op: _Op, *, token: int, worker: str, attempt: int
) -> bool:
    """Insert the op's start under the job's live lease of ``token`` in ``attempt``, if
    the op has no row; False when nothing was inserted (the lease is not live, the job is
    in another attempt, or the op has a row)."""
    params = _start_params(tx, the_op, token=token, worker=worker, attempt=attempt)
    if conn.execute(q.START_EFFECT_FENCED, params).rowcount == 0:
        return False
    # The STARTED entry is the new row's own (start_n).
    tx.note(the_op.job_id, _STARTED, token, worker, op_detail(the_op.op))
    return True


def _record(
    conn: LedgerConnection,
    clock: Clock,
    lease: Lease,
    the_op: _Op,
    text: str,
    *,
    catalog: Catalog,
    probed: bool,
    then: _Then | None,
) -> str:
    """Record ``text`` as the op's result under a live lease, and take ``then`` in the
    same transaction; return the recorded text.

    Raises:
        IllegalTransition: after the result is committed, when ``fn`` moved the job so
            that ``then`` is no longer a move ``advance`` would make.
    """
    refused: IllegalTransition | None = None
    with Tx(conn, "effect_record", clock) as tx:
        if not fenceable(lease):
            fence(conn, lease, tx.now, "run_effect")  # raises the reason it is refused
        token = lease.token
        if probed:
            # The start belongs to another token: its entry leaves the row, which now
            # records this token's result.
            _copy_entries_out(conn, the_op)
            conn.execute(q.CLEAR_START_N, {"job_id": the_op.job_id, "op_key": the_op.key})
        params = {
            "job_id": the_op.job_id,
            "op_key": the_op.key,
            "result": text,
            "now": tx.now,
            "token": token,
            "inline": not probed,
        }
        if conn.execute(q.RECORD_EFFECT, params).rowcount == 0:
            # Either the lease is lost (fence says how), or only a call under this same
            # token could have recorded or removed the start since: another handle of the
            # lease took the effect over.
            token = fence(conn, lease, tx.now, "run_effect")[0]
            raise LeaseLost(
                the_op.job_id, lease.token, token, "the effect was taken over", "run_effect"
            )
        detail = op_detail(the_op.op)
        if probed:
            tx.history(the_op.job_id, _IN_DOUBT, token, lease.worker, detail)
            tx.history(the_op.job_id, _RECORDED, token, lease.worker, detail)
        else:
            # The RECORDED entry is the row's own (finish_n), under the token that
            # started it, which is this one.
            tx.note(the_op.job_id, _RECORDED, token, lease.worker, detail)
        if then is not None and then.move:
            try:
                advance_in(conn, tx, catalog, lease, then.state, asked=THEN, from_state=then.source)
            except IllegalTransition as exc:
                refused = exc  # the effect happened: its result is committed all the same
    if refused is not None:
        raise refused
    return text


def _abort(conn: LedgerConnection, clock: Clock, the_op: _Op, token: int) -> None:
    # fn raised: the caller knows it did not finish, so its start is withdrawn. If even
    # that fails the start stays and the op is merely in doubt; the caller's exception is
    # the one that matters, so a storage error here is not raised over it.
    try:
        with Tx(conn, "effect_abort", clock):
            params = {"job_id": the_op.job_id, "op_key": the_op.key, "token": token}
            # The start happened and stays in the history; only the row goes.
            conn.execute(q.COPY_START_OUT, {**params, "detail": op_detail(the_op.op)})
            conn.execute(q.DELETE_OWN_START, params)
    except StorageError:
        pass


def _copy_entries_out(conn: sqlite3.Connection, the_op: _Op) -> None:
    """Copy the entries the op's row carries to the history table, before it changes."""
    params = {
        "job_id": the_op.job_id,
        "op_key": the_op.key,
        "token": None,
        "detail": op_detail(the_op.op),
    }
    conn.execute(q.COPY_START_OUT, params)
    del params["token"]
    conn.execute(q.COPY_FINISH_OUT, params)


def _encoded(result: object, config: Config, the_op: _Op, source: str) -> str:
    # The model's encoder is the one definition of a recordable result (JSON, str keys,
    # no NaN, within the limit); the decision of what to do about it is made here.
    try:
        return encode_result(result, limit=config.result_limit, depth_limit=config.json_depth_limit)
    except EffectResultError as exc:
        why = str(exc)
    except RecursionError:
        why = "it is nested too deeply to encode"
    raise EffectResultError(
        f"effect {the_op.op!r} of job {the_op.job_id}: {source} returned a result that "
        f"cannot be recorded: {why}. The effect is now in doubt"
    )
