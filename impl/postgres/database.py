"""The connection pool, the transaction helper, the clock rule and error translation.

**The one clock rule.** With no injected clock, ``now`` is the database server's clock:
the transaction's timestamp (``now()``, fixed when the transaction starts), used inside
the statements themselves, so workers on machines with skewed clocks still agree on when
a lease expires and no round trip is spent reading it. With an injected clock, that clock
is read once at the start of each transaction instead and its value is bound to every
statement (the ``clock`` parameter of :data:`queries.NOW`); the server's clock is then
not used at all. Either way, one transaction uses one ``now`` throughout, in SQL and in
Python (:attr:`Tx.now`) alike.

**Telemetry.** Each transaction collects the history entries it appends; once its COMMIT
has succeeded they are passed to :func:`impl.telemetry.emit_history`, in order. A
transaction that rolls back (a crash at ``{op}.before_commit``, an error, a dry run)
reports nothing.

**Transactions.** Every writing operation runs through :meth:`Database.write`, which hits
the failpoints ``{op}.before_tx``, ``{op}.before_commit`` and ``{op}.after_commit``. A
writing transaction runs in pipeline mode: ``BEGIN`` travels with its first statement
and ``COMMIT`` with the final Sync, so a transaction of one statement costs two round
trips, with ``before_commit`` between the write and the commit as ever. The hot path
(claim, effect start, effect record, advance) takes one: its first statement is complete
by itself (:func:`steps.alone`), so :meth:`Database.transact` sends ``BEGIN; EXECUTE
<prepared>; COMMIT`` as one simple query (``before_commit`` is hit before it is sent)
and runs the transaction again the ordinary way only when the statement wrote nothing
and the body needs more (a stale lease, an exhausted job, a replay). psycopg's pipeline
mode costs several times the client CPU of one simple query (0.5-0.6 ms against 0.13 ms
a transaction here), which is why it is not used for these. No
transaction is ever held open while user code runs. A transaction is re-run (a bounded
number of times) when the server reports a deadlock or a serialization failure, and when
its connection turns out to be dead before anything was sent (an idle pooled connection
killed by a server restart or ``pg_terminate_backend``: seen on its socket before a
one-trip transaction is sent, or as the server's own goodbye answering it before BEGIN
did); a connection lost in the middle
of a writing transaction surfaces as :class:`StorageError` and the pool replaces the
connection, so the next call works again. Reads are always safe to re-run.

**Errors.** ``psycopg`` exceptions never escape: lock and statement timeouts become
:class:`DatabaseLocked`, a lost connection :class:`StorageError`, a full disk
:class:`DatabaseFull`, a read-only server :class:`DatabaseReadOnly`, and the state-machine
trigger's refusal :class:`IllegalTransition`.
"""

from __future__ import annotations

import contextlib
import random
import select
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import psycopg
import psycopg.errors
from attrs import define, field
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, TupleRow, dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from impl import failpoint, telemetry
from impl.postgres import queries as q
from impl.postgres import steps
from impl.postgres.channel import channel_of, payload_after
from impl.postgres.schema import (
    FENCE_BACKWARDS_SQLSTATE,
    ILLEGAL_EDGE_SQLSTATE,
    migrate,
    recorded_version,
    set_search_path,
)
from impl.postgres.steps import Op, Steps, Transaction
from model.clock import Clock
from model.config import Config
from model.errors import (
    DatabaseFull,
    DatabaseLocked,
    DatabaseReadOnly,
    IllegalTransition,
    InvalidInput,
    JobledgerError,
    StorageError,
)
from model.record import Detail, Event, HistoryEvent

T = TypeVar("T")

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 8
CONNECT_TIMEOUT = 10
"""Seconds to wait for a new connection to the server."""
TX_ATTEMPTS = 5
"""How many times a transaction runs at most when the server asks for a re-run."""
RETRY_PAUSE = 0.02

_CONNECTION_LOST = ("08", "57P01", "57P02", "57P03")
_SERVER_ENDED = ("57P01", "57P02", "57P03")
"""A session the server itself ended (admin or crash shutdown, starting up): it sent
this as its last message, after any answer it had buffered."""


class Again:
    """The answer of a body that must run again the ordinary way (:meth:`Tx.settle`)."""


AGAIN = Again()


@define
class Tx:
    """One open transaction: its cursor, its one ``now``, and the history it appended.

    ``clock`` is the injected clock's reading for this transaction, or None for the
    server's transaction timestamp. Every statement run through :meth:`one`, :meth:`all`
    and :meth:`run` with parameters gets it bound as ``clock``.
    """

    cur: psycopg.Cursor[DictRow]
    clock: float | None
    pipeline: psycopg.Pipeline | None = None
    events: list[HistoryEvent] = field(factory=list)
    channel: str | None = None
    _server_now: float | None = field(default=None, init=False)
    _announced: set[str] = field(factory=set, init=False)

    @property
    def now(self) -> float:
        """This transaction's ``now`` (asks the server once, only if Python needs it)."""
        if self.clock is not None:
            return self.clock
        if self._server_now is None:
            self.cur.execute(q.SERVER_NOW)
            row = self.cur.fetchone()
            assert row is not None
            self._server_now = float(next(iter(row.values())))
        return self._server_now

    def _bind(self, params: Mapping[str, object] | None) -> Mapping[str, object] | None:
        return None if params is None else {**params, "clock": self.clock}

    def one(self, query: str, params: Mapping[str, object] | None = None) -> DictRow | None:
        """Run ``query`` and return its first row, or None."""
        self.cur.execute(query, self._bind(params))
        return self.cur.fetchone()

    def all(self, query: str, params: Mapping[str, object] | None = None) -> list[DictRow]:
        """Run ``query`` and return every row."""
        self.cur.execute(query, self._bind(params))
        return self.cur.fetchall()

    def run(self, query: str, params: Mapping[str, object] | None = None) -> int:
        """Run ``query`` and return how many rows it touched."""
        self.cur.execute(query, self._bind(params))
        if self.pipeline is not None:
            # A statement without rows is only queued: sync to learn its count (and its
            # error, if any) now; a Sync inside a transaction block commits nothing.
            self.pipeline.sync()
        return self.cur.rowcount

    def announce(self, kind: str, *, later: bool = False) -> None:
        """Wake idle workers (``impl.postgres.pickup``): a job of ``kind`` is eligible
        now, or (``later``) will be at a time they must read.

        ``pg_notify`` is transactional, so they hear it only if this transaction commits,
        and after it did. In a pipeline nobody waits for its answer: it costs no round
        trip (an error would still surface at the commit).
        """
        if self.channel is None:
            return
        payload = payload_after(self._announced, kind, later=later)
        if payload is None:
            return
        self._announced.add(payload)
        self.cur.connection.cursor().execute(
            q.NOTIFY, {"channel": self.channel, "payload": payload}
        )

    def log(
        self,
        job_id: str,
        event: Event,
        *,
        token: int,
        worker: str | None,
        detail: Mapping[str, Detail] | None = None,
    ) -> None:
        """Append ``event`` to the job's history at this transaction's ``now``."""
        self.drive(steps.log(job_id, event, token=token, worker=worker, detail=detail))

    def drive(self, body: Steps[T], first: Op | None = None) -> T:
        """Run a body written as steps (:mod:`impl.postgres.steps`) in this transaction
        (``first``: the step it already asked for)."""
        try:
            op = next(body) if first is None else first
            while True:
                try:
                    reply = self.execute(op)
                except BaseException as exc:
                    op = body.throw(exc)
                else:
                    op = body.send(reply)
        except StopIteration as stop:
            done: T = stop.value
            return done

    def execute(self, op: Op) -> object:
        """Answer one step's request (see :meth:`drive`)."""
        if isinstance(op, steps.One):
            return self.one(op.query, op.params)
        if isinstance(op, steps.All):
            return self.all(op.query, op.params)
        if isinstance(op, steps.Run):
            return self.run(op.query, op.params)
        if isinstance(op, steps.Now):
            return self.now
        if isinstance(op, steps.Logged):
            self.logged(op.event)
            return None
        self.announce(op.kind, later=op.later)
        return None

    def logged(self, event: HistoryEvent) -> None:
        """Note a history entry that a statement appended by itself (for telemetry)."""
        self.events.append(event)

    def settle(self, body: Steps[Any], row: DictRow | None) -> object:
        """Answer ``body``'s first step, complete by itself (:func:`steps.alone`) and
        already committed with ``row``, and run what it does with it.

        Returns :data:`AGAIN` when the body asks for more than history notes, which by
        the step's promise means that statement wrote nothing: the caller then runs the
        transaction again the ordinary way.
        """
        try:
            op = body.send(row)
            while isinstance(op, steps.Logged):
                self.logged(op.event)
                op = body.send(None)
        except StopIteration as stop:
            return stop.value
        body.close()
        self.events.clear()
        return AGAIN


def pool_failure(exc: PoolTimeout | PoolClosed, what: str, where: str, opener: str) -> StorageError:
    """The typed error for a pool that gave ``what`` no connection: none free within the
    busy timeout (:class:`DatabaseLocked`), or the store closed (``opener`` opens another)."""
    if isinstance(exc, PoolTimeout):
        return DatabaseLocked(
            f"{what}: no free connection to {where} within the busy timeout; "
            "too many concurrent calls, or the server is unreachable: retry, or raise "
            "busy_timeout"
        )
    return StorageError(f"{what}: this store is closed; open a new one with {opener}")


def describe(url: str) -> str:
    """Return ``host:port/dbname`` of ``url`` for messages (never the password)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "the given PostgreSQL URL"
    host = info.get("host") or "localhost"
    return f"{host}:{info.get('port') or 5432}/{info.get('dbname') or ''}"


def translate(exc: psycopg.Error, what: str, *, stage: str = "") -> JobledgerError:
    """Return the typed jobledger error for a driver exception raised during ``what``."""
    state = exc.sqlstate or ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if state in (ILLEGAL_EDGE_SQLSTATE, FENCE_BACKWARDS_SQLSTATE):
        return IllegalTransition(
            f"{what}: the database refused the change ({text}); states only follow the "
            "workflow's declared edges and tokens only grow"
        )
    if isinstance(exc, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled):
        return DatabaseLocked(
            f"{what}: PostgreSQL gave up waiting ({text}); another transaction held the rows "
            "too long: retry, or raise busy_timeout"
        )
    if state == "53100":
        return DatabaseFull(f"{what}: the PostgreSQL server's disk is full ({text}); free space")
    if state == "25006":
        return DatabaseReadOnly(
            f"{what}: the PostgreSQL server refuses writes ({text}); connect to the primary"
        )
    if isinstance(exc, psycopg.DataError) or state.startswith("22"):
        return InvalidInput(f"{what}: PostgreSQL cannot store a value ({text}); pass a smaller one")
    if lost(exc):
        outcome = (
            "it may or may not have been committed: read the job before acting on it"
            if stage == "commit"
            else "nothing was changed"
        )
        return StorageError(
            f"{what}: the connection to PostgreSQL was lost ({text}); {outcome}; the store "
            "reconnects by itself, so retry the call once the server is reachable"
        )
    return StorageError(f"{what}: PostgreSQL failed ({state} {text}); check the server log")


def read_schema_version(url: str, schema: str) -> int:
    """Return the schema version recorded at ``url`` in ``schema`` without migrating.

    For ``jobledger migrate --check``: 0 means nothing is there yet; compare with
    ``schema.SCHEMA_VERSION`` (``schema.pending(version)`` lists what opening would apply).

    Raises:
        StorageError: the server cannot be reached.
    """
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
            return recorded_version(conn, schema)
    except psycopg.Error as exc:
        raise translate(exc, f"read the schema version at {describe(url)}") from exc


def lost(exc: psycopg.Error) -> bool:
    """Whether ``exc`` means the connection is gone (shared with impl.postgres.asyncdb)."""
    state = exc.sqlstate or ""
    if state:
        return state.startswith(_CONNECTION_LOST)
    # Without a SQLSTATE the server never answered: a broken or closed connection.
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def retryable(exc: psycopg.Error, stage: str) -> bool:
    """Whether a transaction that raised ``exc`` at ``stage`` may simply run again."""
    if isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
        return stage != "commit"
    return lost(exc) and stage in ("begin", "read")


def _began(control: psycopg.Cursor[TupleRow]) -> bool:
    """Whether the server answered the pipelined BEGIN (so the transaction had begun)."""
    result = control.pgresult
    return result is not None and result.status == psycopg.pq.ExecStatus.COMMAND_OK


def _readable(conn: psycopg.Connection[TupleRow]) -> bool:
    """Whether an idle pooled connection has something to read (no round trip): only a
    session the server ended (its last message, or the end of the stream) does."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        ready, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(ready)


class _OneTrip(psycopg.ClientCursor[DictRow]):
    """Runs ``BEGIN; EXECUTE ...; COMMIT`` as one simple query (:func:`queries.prepared`),
    its parameters bound by psycopg on the client, and keeps what each part answered,
    also when one failed (to tell whether the server had begun)."""

    answers: tuple[psycopg.pq.ExecStatus, ...] = ()

    # psycopg's hook for a query's results (private, psycopg 3.1 to 3.3): it raises on an
    # error before the cursor keeps them. Should a later psycopg stop calling it, the
    # answers stay empty and a lost session is taken as "may have committed" (reported,
    # never re-run): safe, only less forgiving.
    def _check_results(self, results: list[psycopg.pq.abc.PGresult], *args: Any) -> None:
        self.answers = tuple(psycopg.pq.ExecStatus(r.status) for r in results)
        super()._check_results(results, *args)


def _one_trip_stage(exc: psycopg.Error, trip: _OneTrip | None) -> str:
    """The stage at which a one-trip transaction failed, for :func:`retryable`.

    An error the server answered aborted the block, so the COMMIT after it did nothing:
    "body". A lost session is known to have run nothing only when its first answer
    (BEGIN's) is the server's own message that it ended the session (an idle session
    terminated as the query arrived): "begin". Otherwise the COMMIT may have run: "commit".
    """
    if not lost(exc):
        return "body"
    answers = () if trip is None else trip.answers
    first_failed = bool(answers) and answers[0] == psycopg.pq.ExecStatus.FATAL_ERROR
    if first_failed and (exc.sqlstate or "").startswith(_SERVER_ENDED):
        return "begin"
    return "commit"


def _unused(_tx: Tx) -> Any:
    """The body slot of a one-trip transaction, whose steps run in ``_run`` itself."""
    raise AssertionError("unreachable: a one-trip transaction runs its steps itself")


def _roll_back(conn: psycopg.Connection[TupleRow]) -> None:
    """End a failed pipelined transaction; a dead connection is left to the pool."""
    with contextlib.suppress(psycopg.Error):
        if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()


class Database:
    """A pool of connections to one ledger schema and the transactions run on it.

    Args:
        url: a ``postgresql://`` connection URL.
        schema: the PostgreSQL schema that holds the ledger (created when missing).
        clock: an injected clock, or None for the server's clock.
        config: tunables (``busy_timeout`` becomes the server's ``lock_timeout``).

    Raises:
        StorageError: the server cannot be reached, or the schema cannot be migrated.
        SchemaVersionError: the schema is newer than this code.
    """

    def __init__(self, url: str, *, schema: str, clock: Clock | None, config: Config) -> None:
        self.schema = schema
        self.url = url
        self.channel = channel_of(schema)
        """The ``LISTEN`` channel of this ledger, the same in every process."""
        self.where = f"{describe(url)} schema {schema!r}"
        self._clock = clock
        # PostgreSQL reads a lock_timeout of 0 as "wait forever"; a busy timeout of 0
        # means "do not wait", so it becomes the shortest wait the server accepts.
        self._lock_timeout = f"{max(1, round(config.busy_timeout * 1000))}ms"
        self._closed = False
        self.speculate = True
        """Whether :meth:`transact` commits a first step that is complete by itself in
        one round trip (:meth:`Tx.settle`); off, every transaction takes two."""
        self._plans: dict[str, q.Prepared] = {}
        self._ready: weakref.WeakKeyDictionary[psycopg.Connection[TupleRow], set[str]] = (
            weakref.WeakKeyDictionary()
        )
        """The statements prepared on each pooled connection (a new one has none)."""
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                migrate(conn, schema)
        except psycopg.Error as exc:
            raise translate(exc, f"open the ledger at {self.where}") from exc
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            url,
            min_size=POOL_MIN_SIZE,
            max_size=POOL_MAX_SIZE,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
            configure=self._configure,
            timeout=max(config.busy_timeout, 1.0),
            name=f"jobledger:{schema}",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except PoolTimeout as exc:
            self._pool.close()
            raise StorageError(
                f"open the ledger at {self.where}: no connection within {CONNECT_TIMEOUT} s; "
                "check that the server is up and accepts connections"
            ) from exc

    def _configure(self, conn: psycopg.Connection[TupleRow]) -> None:
        set_search_path(conn, self.schema, local=False)
        conn.execute(q.SET_LOCK_TIMEOUT, {"timeout": self._lock_timeout})
        conn.execute(q.SET_NO_JIT)

    def _clock_reading(self) -> float | None:
        return None if self._clock is None else float(self._clock())

    def close(self) -> None:
        """Close every pooled connection; later calls raise ``StorageError``."""
        self._closed = True
        self._pool.close()

    # -- transactions --------------------------------------------------------------

    def check_open(self) -> None:
        """Raise ``StorageError`` once the store is closed."""
        if self._closed:
            raise StorageError("this store is closed; open a new one with impl.open_store")

    def write(self, op: str, body: Callable[[Tx], T], *, failpoints: bool = True) -> T:
        """Run ``body`` in one writing transaction with the ``op`` failpoints around it."""
        if not failpoints:
            return self._run(op, body)
        failpoint.hit(f"{op}.before_tx")
        out = self._run(op, body, commit_point=f"{op}.before_commit")
        failpoint.hit(f"{op}.after_commit")
        return out

    def transact(self, transaction: Transaction[T]) -> T:
        """Run a writing transaction written as steps (shared with the async face).

        A body whose first step is complete by itself (:func:`steps.alone`: the hot
        path's claim, effect start and record, advance) commits it in one round trip;
        if the body then asks for more, the statement wrote nothing and the transaction
        runs again the ordinary way, with the same failpoints.
        """
        op = transaction.op
        failpoint.hit(f"{op}.before_tx")
        commit_point = f"{op}.before_commit"
        out: T | Again = AGAIN
        if self.speculate:
            out = self._run(op, _unused, commit_point=commit_point, alone=transaction.body)
        if isinstance(out, Again):
            out = self._run(op, lambda tx: tx.drive(transaction.body()), commit_point=commit_point)
        failpoint.hit(f"{op}.after_commit")
        return out

    def read(self, what: str, body: Callable[[Tx], T]) -> T:
        """Run ``body`` in a read-only snapshot transaction."""
        return self._run(what, body, read_only=True)

    def dry(self, what: str, body: Callable[[Tx], T]) -> T:
        """Run ``body`` in a transaction that is always rolled back."""
        return self._run(what, body, rollback=True)

    def _run(
        self,
        what: str,
        body: Callable[[Tx], T],
        *,
        commit_point: str | None = None,
        read_only: bool = False,
        rollback: bool = False,
        alone: Callable[[], Steps[Any]] | None = None,
    ) -> T:
        self.check_open()
        attempt = 0
        while True:
            attempt += 1
            stage = "read" if read_only else "begin"
            control: psycopg.Cursor[TupleRow] | None = None
            spoken = False  # BEGIN, the first statement and COMMIT went together (one trip)
            trip: _OneTrip | None = None
            try:
                with self._pool.connection() as conn:
                    if alone is not None and _readable(conn):
                        # Something waits on an idle connection: the server ended the
                        # session. A BEGIN sent apart tells that nothing ran, so this
                        # call goes the ordinary way (and re-runs safely).
                        return cast(T, AGAIN)
                    if read_only or rollback:
                        with conn.transaction(force_rollback=rollback):
                            cur = conn.cursor(row_factory=dict_row)
                            if read_only:
                                cur.execute(q.READ_ONLY)
                            tx = Tx(cur, self._clock_reading(), channel=self.channel)
                            if not read_only:
                                stage = "body"
                            out = body(tx)
                        return out
                    if alone is not None:
                        body_steps = alone()
                        first = next(body_steps, None)
                        if not (isinstance(first, steps.One) and first.alone):
                            body_steps.close()
                            return cast(T, AGAIN)  # nothing was sent
                        plan = self._plans.get(first.query)
                        if plan is None:
                            plan = self._plans[first.query] = q.prepared(first.query)
                        ready = self._ready.setdefault(conn, set())
                        if plan.name not in ready:
                            # Once per connection, in no transaction: the plan then stays
                            # cached on the server as psycopg's prepared statements do.
                            conn.execute(plan.prepare)
                            ready.add(plan.name)
                        trip = _OneTrip(conn, row_factory=dict_row)
                        tx = Tx(trip, self._clock_reading(), channel=self.channel)
                        stage = "body"
                        if commit_point is not None:
                            failpoint.hit(commit_point)
                        stage = "commit"
                        spoken = True
                        try:
                            trip.execute(plan.one_trip, tx._bind(first.params))
                        except BaseException:
                            _roll_back(conn)
                            raise
                        trip.nextset()  # past BEGIN's answer, to the statement's
                        out = cast(T, tx.settle(body_steps, trip.fetchone()))
                    else:
                        control = conn.cursor()
                        try:
                            with conn.pipeline() as pipe:
                                control.execute(q.BEGIN)
                                tx = Tx(
                                    conn.cursor(row_factory=dict_row),
                                    self._clock_reading(),
                                    pipe,
                                    channel=self.channel,
                                )
                                out = body(tx)
                                stage = "body"
                                if commit_point is not None:
                                    failpoint.hit(commit_point)
                                stage = "commit"
                                control.execute(q.COMMIT)
                            # Leaving the pipeline sent the Sync: COMMIT's answer is in.
                        except BaseException:
                            _roll_back(conn)
                            raise
                # Committed: only now may the world hear of what it recorded.
                for event in tx.events:
                    telemetry.emit_history(event)
                return out
            except (PoolTimeout, PoolClosed) as exc:
                raise pool_failure(exc, what, self.where, "impl.open_store") from exc
            except psycopg.Error as exc:
                if stage == "begin" and control is not None and _began(control):
                    stage = "body"  # BEGIN was answered: the loss came inside the body
                if spoken:
                    stage = _one_trip_stage(exc, trip)
                    if isinstance(exc, psycopg.errors.InvalidSqlStatementName) and trip is not None:
                        # psycopg ends a rollback with DEALLOCATE ALL (its own prepared
                        # statements may be stale), ours went too. EXECUTE failed, so
                        # nothing ran: prepare again on this connection and re-run.
                        self._ready.pop(trip.connection, None)
                        if attempt < TX_ATTEMPTS:
                            continue
                if attempt < TX_ATTEMPTS and retryable(exc, stage):
                    if lost(exc):
                        # One dead session usually means all idle ones died with it (a
                        # server restart): drop them now instead of one per attempt.
                        self._pool.check()
                    time.sleep(RETRY_PAUSE * attempt * (1 + random.random()))
                    continue
                raise translate(exc, what, stage=stage) from exc
