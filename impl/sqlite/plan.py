"""Planning jobs on SQLite: ``plan`` and ``plan_many`` in one transaction.

Items are validated in order, inside the write transaction, and a failing batch plans
nothing. A batch of valid items with distinct keys is inserted at once (keys already
planned are skipped), and only if some were skipped are the stored payloads read, to
raise for the first item in order whose payload differs. A batch with an invalid item or
a repeated key is checked against the stored jobs and the items before it first, so the
first bad item decides the error exactly as in the model. Each identity is canonically
encoded once, for its key and its stored text alike; a new row's PLANNED history entry
is implied by its creation time (see ``read.history``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Mapping
from typing import Final, NamedTuple

from impl import telemetry
from impl.sqlite import queries as q
from impl.sqlite.catalog import Catalog
from impl.sqlite.connection import LedgerConnection, Tx, reading
from model.clock import Clock
from model.config import Config
from model.errors import IdempotencyConflict, InvalidPayload
from model.key import (
    KEY_VERSION,
    Scalar,
    canon,
    canon_flat,
    canon_flat_chunks,
    check_scalars,
    not_unicode,
)
from model.record import Event, Plan
from model.validate import INT64_MAX, INT64_MIN, check_int, check_seconds, encode_payload

_PLANNED = Event.PLANNED.value
_NULL = "null"
# The stored "payload" of a key whose job was pruned: it stays planned and, its payload
# not being kept, never conflicts (model.retention). Compared by identity.
_PRUNED = "<pruned>"


_Row = tuple[str, str, str, str, str, int, int, float, float, float]
"""A job to insert: the parameters of ``queries.INSERT_JOB`` in order (job_id, kind,
identity, payload, state, max_attempts, priority, run_at, created_at, updated_at). A
plain tuple, built once per job: ``sqlite3`` binds a plain tuple fastest."""
_ID: Final = 0
_IDENTITY: Final = 2
_PAYLOAD: Final = 3


class _Batch(NamedTuple):
    """What every job of one planning call shares."""

    kind: str
    kind_text: str
    state: str
    now: float
    max_attempts: int
    depth_limit: int


# The value types an identity is made of, exactly: a dict of these needs no copy before
# encoding (subclasses and other mappings go through model.key.check_scalars).
_PLAIN = frozenset({str, int, bool, type(None)})


def plan_items(
    conn: LedgerConnection,
    clock: Clock,
    config: Config,
    catalog: Catalog,
    *,
    op: str,
    kind: str,
    items: list[Mapping[str, Scalar] | Plan],
) -> list[str]:
    """Plan ``items`` of ``kind`` in one transaction named ``op``; return ids in order.

    Raises:
        UnknownWorkflow, InvalidIdentity, InvalidPayload, InvalidInput,
        IdempotencyConflict: for the first item in order that has a problem; then
        nothing is planned.
    """
    reading(conn, op, lambda: catalog.get(conn, kind))
    with Tx(conn, op, clock) as tx:
        now = tx.now
        workflow = catalog.get(conn, kind)
        kind_text = canon(kind).decode("utf-8")
        # Every item is validated first, in order, up to the first invalid one; then the
        # items before it are checked against the stored jobs and the earlier items, so
        # an earlier conflict still wins over a later invalid item, as in the model.
        batch = _Batch(
            kind, kind_text, workflow.initial, now, config.max_attempts, config.json_depth_limit
        )
        prepared, invalid = _prepare_all(batch, items)
        fresh = prepared
        ids = [p[_ID] for p in prepared]
        if invalid is None and len(set(ids)) == len(ids):
            # The usual batch, all new: insert first (existing keys are skipped), and
            # compare payloads only if some key was planned before.
            (last_seq,) = conn.execute(q.SELECT_LAST_SEQ).fetchone()
            changes = conn.total_changes
            conn.executemany(q.INSERT_JOB, prepared)
            if conn.total_changes - changes != len(prepared):
                stored = _stored_payloads(conn, ids, last_seq)
                fresh = _check_payloads(op, kind, prepared, stored)
        else:
            stored = _stored_payloads(conn, ids, None)
            fresh = _check_payloads(op, kind, prepared, stored)
            if invalid is not None:
                raise invalid
            conn.executemany(q.INSERT_JOB, fresh)
        if telemetry.history_wanted():  # else a big batch's entries go nowhere
            tx.events.extend((p[_ID], now, _PLANNED, 0, None, "{}") for p in fresh)
    return ids


def _stored_payloads(
    conn: sqlite3.Connection, ids: list[str], last_seq: int | None
) -> dict[str, str]:
    """The stored payloads of the batch's keys (only of rows up to ``last_seq``), and
    :data:`_PRUNED` for the keys of pruned jobs."""
    ids_text = json.dumps(ids)
    found = conn.execute(q.SELECT_PAYLOADS, {"ids": ids_text, "last_seq": last_seq})
    stored = dict(found.fetchall())
    for (job_id,) in conn.execute(q.SELECT_TOMBSTONED, {"ids": ids_text}):
        stored[job_id] = _PRUNED
    return stored


def _check_payloads(op: str, kind: str, prepared: list[_Row], stored: dict[str, str]) -> list[_Row]:
    """Raise for the first item whose key is planned (before it) with another payload;
    return the items that are new, first occurrences only."""
    seen = dict(stored)
    fresh: list[_Row] = []
    for new in prepared:
        job_id, payload = new[_ID], new[_PAYLOAD]
        found = seen.get(job_id)
        if found is None:
            fresh.append(new)
            seen[job_id] = payload
        elif found is not _PRUNED and found != payload:
            raise IdempotencyConflict(
                f"{op} of a {kind!r} job with identity {new[_IDENTITY]}: job "
                f"{job_id} is already planned with payload {found}, not "
                f"{payload}; a job's payload is fixed at planning: plan a "
                "different identity, or keep the payload"
            )
    return fresh


def job_key_of(kind_text: str, identity_text: str) -> str:
    """Return the job key from the canonical texts of the kind and the identity.

    The same as :func:`model.key.job_key` (the tests pin the two together), built from
    the identity's canonical text so that each identity is encoded only once, for its
    key and for its stored column: sorted keys put ``"id"`` first, then ``"kind"``,
    then ``"v"``, with no white space.
    """
    text = _KEY_HEAD + identity_text + _key_tail(kind_text)
    try:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    except UnicodeEncodeError as exc:
        raise not_unicode("the kind or identity", exc) from None


_KEY_HEAD = '{"id":'


def _key_tail(kind_text: str) -> str:
    """What follows the identity in the text a job key hashes (see :func:`job_key_of`)."""
    return f',"kind":{kind_text},"v":{KEY_VERSION}}}'


def _prepare_all(
    batch: _Batch, items: list[Mapping[str, Scalar] | Plan]
) -> tuple[list[_Row], Exception | None]:
    """Prepare ``items`` in order up to the first invalid one; return them and its error.

    The usual item of a big batch, a plain dict of str to str/int/bool/None, is handled
    in the loop itself (the steps of :func:`_identity_text` and :func:`job_key_of`):
    calls per item are much of what planning costs in Python.
    """
    prepared: list[_Row] = []
    append = prepared.append
    sha256 = hashlib.sha256
    tail = _key_tail(batch.kind_text)
    kind, state, now, attempts = batch.kind, batch.state, batch.now, batch.max_attempts
    plain = _PLAIN
    chunks, join = canon_flat_chunks, "".join  # canon_flat, without a call per item
    for item in items:
        if type(item) is dict:
            for key, value in item.items():
                if type(key) is not str or type(value) not in plain:
                    break
            else:
                text = join(chunks(item, 0))
                try:
                    job_id = sha256((_KEY_HEAD + text + tail).encode("utf-8")).hexdigest()
                except UnicodeEncodeError as exc:  # a lone surrogate: the model refuses it
                    return prepared, not_unicode("the kind or identity", exc)
                append((job_id, kind, text, _NULL, state, attempts, 0, now, now, now))
                continue
        try:
            append(_prepare(batch, item))
        except Exception as exc:  # raised by the caller, after any earlier conflict
            return prepared, exc
    return prepared, None


def _prepare(batch: _Batch, item: Mapping[str, Scalar] | Plan) -> _Row:
    if isinstance(item, Plan):
        identity, payload_value = item.identity, item.payload
        priority, attempts, run_at_value = item.priority, item.max_attempts, item.run_at
    else:
        identity, payload_value, priority, attempts, run_at_value = item, None, 0, None, None
    identity_text = _identity_text(identity)
    job_id = job_key_of(batch.kind_text, identity_text)
    if payload_value is None:
        payload = _NULL
    else:
        try:
            payload = encode_payload(payload_value, depth_limit=batch.depth_limit)
        except RecursionError:
            raise InvalidPayload(
                f"payload of the {batch.kind!r} job {job_id} is nested too deeply to encode as JSON"
            ) from None
    if type(priority) is not int or not INT64_MIN <= priority <= INT64_MAX:
        priority = check_int(priority, name="priority")
    if attempts is not None:
        check_int(attempts, name="max_attempts", minimum=1)
    now = batch.now
    run_at = now if run_at_value is None else check_seconds(run_at_value, name="run_at")
    return (
        job_id,
        batch.kind,
        identity_text,
        payload,
        batch.state,
        attempts if attempts is not None else batch.max_attempts,
        priority,
        run_at,
        now,
        now,
    )


def _identity_text(identity: object) -> str:
    """The canonical text of a valid identity; ``InvalidIdentity`` for anything else."""
    if type(identity) is dict:
        for key, value in identity.items():
            if type(key) is not str or type(value) not in _PLAIN:
                break
        else:
            return canon_flat(identity)
    return canon_flat(check_scalars(identity, what="identity"))
