"""Every SQL statement the PostgreSQL store runs at run time, in one place.

Values are always bound parameters (``%(name)s``); the text is built only from the
constant fragments below. Unqualified names resolve in the ledger's schema through the
``search_path`` set on every pooled connection. Statements that act under a lease carry
the fence (:data:`FENCE`) in their own ``WHERE``, so a stale or expired token changes
nothing even if a caller skipped the check before it.
"""

from __future__ import annotations

import hashlib
import re

from attrs import frozen
from psycopg import sql

# -- sessions and time ----------------------------------------------------------------

NOW = "coalesce(%(clock)s::double precision, extract(epoch FROM now())::double precision)"
"""The transaction's ``now`` inside a statement (the one clock rule): the injected clock's
reading (the ``clock`` parameter, bound by every :class:`~impl.postgres.database.Tx`
statement) or, when it is NULL, the server's transaction timestamp, which is the same
value for every statement of one transaction, so no separate query reads it."""

SERVER_NOW = "SELECT extract(epoch FROM now())::double precision"
"""The server's ``now`` for Python-side decisions: the transaction timestamp, so it equals
:data:`NOW` in every statement of the same transaction."""

SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %(timeout)s, false)"
"""Per session: a row lock waited on longer than the busy timeout is DatabaseLocked."""

SET_NO_JIT = "SELECT set_config('jit', 'off', false)"
"""Per session: no JIT compilation. Every statement of the store is short, and the
planner's estimate for one (the pending jobs' count of ``stats`` at ten million jobs,
which it expects to return 100,000 rows and returns none) passes the cost at which the
server compiles it: 590 ms of compiling for a statement that runs in 160 ms."""

READ_ONLY = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
BEGIN = "BEGIN"
COMMIT = "COMMIT"


@frozen
class Prepared:
    """A statement prepared on the server under ``name`` (``$n`` for each parameter),
    run in a transaction of its own in one round trip (:func:`prepared`)."""

    name: str
    prepare: str
    """``PREPARE``: run once per connection."""
    one_trip: str
    """``BEGIN; EXECUTE ...; COMMIT`` as one simple query; psycopg binds its arguments
    on the client (``psycopg.ClientCursor``) and the server types them as the prepared
    statement's parameters."""


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def prepared(statement: str) -> Prepared:
    """``statement`` (``%(name)s`` parameters) as a :class:`Prepared`."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    body = _PLACEHOLDER.sub(number, statement.strip())
    name = "jl_" + hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]
    arguments = ", ".join(f"%({n})s" for n in names)
    call = f"EXECUTE {name}({arguments})" if names else f"EXECUTE {name}"
    return Prepared(name, f"PREPARE {name} AS {body}", f"BEGIN;\n{call};\nCOMMIT")


# -- workflows -------------------------------------------------------------------------

WORKFLOW = "SELECT definition FROM workflows WHERE name = %(name)s"
# COLLATE "C" sorts by code point, as Python does, whatever the database's collation.
WORKFLOWS = 'SELECT definition FROM workflows ORDER BY name COLLATE "C"'
INSERT_WORKFLOW = """
INSERT INTO workflows (name, definition, initial, failed)
VALUES (%(name)s, %(definition)s, %(initial)s, %(failed)s)
ON CONFLICT (name) DO NOTHING
RETURNING name
"""
INSERT_STATE = """
INSERT INTO workflow_states (kind, state, terminal) VALUES (%(kind)s, %(state)s, %(terminal)s)
"""
INSERT_EDGE = "INSERT INTO workflow_edges (kind, src, dst) VALUES (%(kind)s, %(src)s, %(dst)s)"

# -- jobs ------------------------------------------------------------------------------

JOB_COLUMNS = """
job_id, kind, identity, payload, state, attempts, max_attempts, priority, run_at, token,
lease_worker, lease_expires_at, last_error, failed_from, created_at, updated_at, seq
"""

FENCE = """
job_id = %(job_id)s AND token = %(token)s
AND lease_worker IS NOT NULL AND lease_expires_at > %(now)s
"""
"""The lease check inside every writing statement: the token is current and not expired."""

JOB = "SELECT " + JOB_COLUMNS + " FROM jobs WHERE job_id = %(job_id)s"
JOB_FOR_UPDATE = JOB + " FOR UPDATE"
JOB_STATE = "SELECT state FROM jobs WHERE job_id = %(job_id)s"
JOB_EXISTS = "SELECT 1 FROM jobs WHERE job_id = %(job_id)s"
JOB_PAYLOAD = "SELECT payload FROM jobs WHERE job_id = %(job_id)s"

COUNTS_LOCK_KEY = "hashtext('jobledger:counts:' || current_schema())"
COUNTS_LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared(" + COUNTS_LOCK_KEY + ")"
"""Held by every transaction that numbers a new job, retries one or deletes some, so the
counts' refresh (which takes it exclusively) sees every job below its watermark and no
finished one changes under it (impl/postgres/rollup.py)."""
COUNTS_LOCK = "SELECT pg_advisory_xact_lock(" + COUNTS_LOCK_KEY + ")"

INSERT_JOB = (
    """
WITH counts_lock AS MATERIALIZED ("""
    + COUNTS_LOCK_SHARED
    + """)
INSERT INTO jobs (
    job_id, kind, identity, payload, state, attempts, max_attempts, priority, run_at,
    token, created_at, updated_at
) SELECT
    %(job_id)s, %(kind)s, %(identity)s, %(payload)s, %(state)s, 0, %(max_attempts)s,
    %(priority)s, coalesce(%(run_at)s::double precision, """
    + NOW
    + "), 0, "
    + NOW
    + ", "
    + NOW
    + """
FROM counts_lock
WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE job_id = %(job_id)s)
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
"""
)
"""Plan one job unless its key is planned or was pruned (a tombstone). The tombstone
check reads the statement's snapshot: a prune that commits while the insert waits on the
row it deletes is caught by :data:`PRUNED_AMONG` afterwards."""

CLEAR_EXPIRED_LEASE = """
UPDATE jobs SET lease_worker = NULL, lease_expires_at = NULL, updated_at = %(now)s
WHERE job_id = %(job_id)s AND token = %(token)s AND lease_expires_at <= %(now)s
"""
GRANT = (
    """
UPDATE jobs
   SET token = token + 1, attempts = attempts + 1, lease_worker = %(worker)s,
       lease_expires_at = %(expires_at)s, updated_at = %(now)s
 WHERE job_id = %(job_id)s AND token = %(token)s AND lease_worker IS NULL
   AND attempts < max_attempts
RETURNING """
    + JOB_COLUMNS
)
ENTER_FAILED = """
UPDATE jobs
   SET state = %(failed)s, failed_from = state, last_error = %(error)s,
       lease_worker = NULL, lease_expires_at = NULL, updated_at = %(now)s
 WHERE job_id = %(job_id)s AND token = %(token)s
"""
"""Into the failed state with the token unchanged (exhausted attempts, final failures)."""

RENEW = (
    """
UPDATE jobs SET lease_expires_at = %(expires_at)s, updated_at = %(now)s
 WHERE """
    + FENCE
    + " RETURNING "
    + JOB_COLUMNS
)
RELEASE = (
    """
UPDATE jobs
   SET attempts = attempts - 1, lease_worker = NULL, lease_expires_at = NULL,
       run_at = %(run_at)s, updated_at = %(now)s
 WHERE """
    + FENCE
    + " RETURNING job_id"
)
ADVANCE = (
    """
UPDATE jobs
   SET state = %(to_state)s,
       lease_worker = CASE WHEN %(ends)s THEN NULL ELSE lease_worker END,
       lease_expires_at = CASE WHEN %(ends)s THEN NULL ELSE lease_expires_at END,
       updated_at = %(now)s
 WHERE """
    + FENCE
    + " AND state = %(from_state)s RETURNING job_id"
)
FAIL_LATER = (
    """
UPDATE jobs
   SET lease_worker = NULL, lease_expires_at = NULL, run_at = %(run_at)s,
       last_error = %(error)s, updated_at = %(now)s
 WHERE """
    + FENCE
    + " RETURNING job_id"
)
FAIL_FINAL = (
    """
UPDATE jobs
   SET state = %(failed)s, failed_from = state, last_error = %(error)s,
       lease_worker = NULL, lease_expires_at = NULL, updated_at = %(now)s
 WHERE """
    + FENCE
    + " RETURNING job_id"
)
CANCEL = """
UPDATE jobs
   SET token = token + 1, state = %(failed)s, failed_from = state, last_error = %(reason)s,
       lease_worker = NULL, lease_expires_at = NULL, updated_at = %(now)s
 WHERE job_id = %(job_id)s AND state = %(from_state)s
RETURNING token
"""
RETRY = """
UPDATE jobs
   SET token = token + 1, state = %(to_state)s, attempts = 0, run_at = %(now)s,
       lease_worker = NULL, lease_expires_at = NULL, updated_at = %(now)s
 WHERE job_id = %(job_id)s AND state = %(failed)s
RETURNING token
"""

_JOBS_FILTER = """
 WHERE (%(state)s::text IS NULL OR state = %(state)s::text)
   AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
"""
JOBS = "SELECT " + JOB_COLUMNS + " FROM jobs" + _JOBS_FILTER + " ORDER BY seq LIMIT %(limit)s"
JOBS_NEWEST = (
    "SELECT " + JOB_COLUMNS + " FROM jobs" + _JOBS_FILTER + " ORDER BY seq DESC LIMIT %(limit)s"
)
LEASES = """
SELECT job_id, kind, state, lease_worker, token, lease_expires_at
  FROM jobs WHERE lease_worker IS NOT NULL
 ORDER BY lease_expires_at, job_id COLLATE "C"
"""

# -- history ---------------------------------------------------------------------------

LOG = (
    """
INSERT INTO history (job_id, at, event, token, worker, detail)
VALUES (%(job_id)s, """
    + NOW
    + """, %(event)s, %(token)s, %(worker)s, %(detail)s)
RETURNING at
"""
)
HISTORY = """
SELECT job_id, at, event, token, worker, detail FROM history
 WHERE job_id = %(job_id)s ORDER BY id
"""

# -- effects ---------------------------------------------------------------------------

EFFECT_COLUMNS = """
op_key, job_id, op, extras, status, result, started_at, finished_at, token, started_by
"""
EFFECT_FOR_UPDATE = (
    "SELECT " + EFFECT_COLUMNS + " FROM effects WHERE op_key = %(op_key)s FOR UPDATE"
)
EFFECTS = "SELECT " + EFFECT_COLUMNS + " FROM effects WHERE job_id = %(job_id)s ORDER BY seq"
EFFECT_START = """
INSERT INTO effects (op_key, job_id, op, extras, status, started_at, token, started_by)
VALUES (%(op_key)s, %(job_id)s, %(op)s, %(extras)s, 'started', %(now)s, %(token)s, %(worker)s)
ON CONFLICT (op_key) DO UPDATE
   SET status = 'started', result = NULL, started_at = EXCLUDED.started_at,
       finished_at = NULL, token = EXCLUDED.token, started_by = EXCLUDED.started_by,
       extras = EXCLUDED.extras
 WHERE effects.status <> 'done'
RETURNING op_key
"""
"""Record a start; a start left in doubt is overwritten in place (keeping its order)."""

EFFECT_ABORT = """
DELETE FROM effects WHERE op_key = %(op_key)s AND status = 'started' AND token = %(token)s
"""
EFFECT_TO_DOUBT = """
UPDATE effects SET status = 'in_doubt'
 WHERE op_key = %(op_key)s AND status = 'started' AND token = %(token)s
RETURNING op_key
"""
EFFECT_RECORD = (
    """
UPDATE effects
   SET status = 'done', result = %(result)s, finished_at = %(now)s, token = %(token)s
 WHERE op_key = %(op_key)s AND status <> 'done'
   AND EXISTS (
       SELECT 1 FROM jobs WHERE """
    + FENCE
    + """
   )
RETURNING op_key
"""
)
"""Record a result, fenced by the lease in the same statement; a done row never changes."""

# -- reconcile -------------------------------------------------------------------------

EXPIRE_DEAD_LEASES = """
WITH dead AS (
    SELECT job_id, token, lease_worker FROM jobs
     WHERE lease_worker IS NOT NULL AND lease_expires_at <= %(now)s
     ORDER BY seq
       FOR UPDATE
), cleared AS (
    UPDATE jobs SET lease_worker = NULL, lease_expires_at = NULL, updated_at = %(now)s
      FROM dead WHERE jobs.job_id = dead.job_id
    RETURNING dead.job_id, dead.token, dead.lease_worker, jobs.seq
)
INSERT INTO history (job_id, at, event, token, worker, detail)
SELECT job_id, %(now)s, 'expired', token, lease_worker, '{}' FROM cleared ORDER BY seq
RETURNING job_id, at, event, token, worker, detail
"""
DOUBT_DEAD_STARTS = """
WITH dead AS (
    SELECT e.op_key, j.token FROM effects e JOIN jobs j ON j.job_id = e.job_id
     WHERE e.status = 'started'
       AND (e.token <> j.token OR j.lease_worker IS NULL OR j.lease_expires_at <= %(now)s)
     ORDER BY e.seq
       FOR UPDATE OF e, j
), marked AS (
    UPDATE effects SET status = 'in_doubt'
      FROM dead WHERE effects.op_key = dead.op_key
    RETURNING effects.job_id, effects.op, effects.started_by, effects.seq, dead.token
)
INSERT INTO history (job_id, at, event, token, worker, detail)
SELECT m.job_id, %(now)s, 'effect_in_doubt', m.token, m.started_by,
       json_build_object('op', m.op)::text
  FROM marked m
 ORDER BY m.seq
RETURNING job_id, at, event, token, worker, detail
"""
"""Mark the starts of dead leases in doubt, each entry under its job's token as locked.

The token comes from the locked row, not from a join in the INSERT: a claim that
committed while this statement waited for the job's lock is seen by the lock (which
returns the row's newest version) but not by the statement's own snapshot, so a join
there wrote the previous lease's token after the new lease's entry (found by the crash
fuzz's token-order check)."""
EXHAUSTED = """
SELECT j.job_id, j.kind, j.token, j.attempts, j.max_attempts
  FROM jobs j
 WHERE j.active AND j.attempts >= j.max_attempts
   AND (j.lease_worker IS NULL OR j.lease_expires_at <= %(now)s)
 ORDER BY j.seq
   FOR UPDATE OF j
"""

# -- stats -----------------------------------------------------------------------------

SUMMARY = """
SELECT
    (SELECT count(*) FROM jobs
      WHERE lease_worker IS NOT NULL AND lease_expires_at > %(now)s) AS leases_live,
    (SELECT count(*) FROM jobs
      WHERE lease_worker IS NOT NULL AND lease_expires_at <= %(now)s) AS leases_expired,
    (SELECT count(*) FROM effects e JOIN jobs j ON j.job_id = e.job_id
      WHERE e.status = 'in_doubt'
         OR (e.status = 'started' AND (e.token <> j.token OR j.lease_worker IS NULL
                                       OR j.lease_expires_at <= %(now)s))) AS in_doubt
"""

# -- the hot path: one statement per transaction ---------------------------------------
#
# Each statement below checks the fence, writes, and appends the history in one round
# trip (data-modifying CTEs always run to completion, read or not). When one changes
# nothing, the caller runs the general code in the same transaction, which reads the row
# only to say why (LeaseLost, IllegalTransition) or to take the rare branch.

FENCE_NOW = (
    """
job_id = %(job_id)s AND token = %(token)s
AND lease_worker IS NOT NULL AND lease_expires_at > """
    + NOW
)
"""The lease check inside a hot-path statement, at the statement's own :data:`NOW`."""

_J_COLUMNS = ", ".join("j." + c.strip() for c in JOB_COLUMNS.split(","))


def _claim(kinds_filter: str) -> str:
    return (
        """
WITH cand AS (
    SELECT job_id, token, lease_worker, attempts, max_attempts
      FROM jobs
     WHERE active AND run_at <= """
        + NOW
        + " AND (lease_worker IS NULL OR lease_expires_at <= "
        + NOW
        + ")"
        + kinds_filter
        + """
     ORDER BY priority DESC, run_at, seq LIMIT 1
       FOR UPDATE SKIP LOCKED
), granted AS (
    UPDATE jobs AS j
       SET token = j.token + 1, attempts = j.attempts + 1, lease_worker = %(worker)s,
           lease_expires_at = """
        + NOW
        + " + %(ttl)s, updated_at = "
        + NOW
        + """
      FROM cand
     WHERE j.job_id = cand.job_id AND cand.attempts < cand.max_attempts
    RETURNING """
        + _J_COLUMNS
        + """, cand.token AS old_token, cand.lease_worker AS old_worker
), logged AS (
    INSERT INTO history (job_id, at, event, token, worker, detail)
    SELECT job_id, updated_at, event, token, worker, '{}'
      FROM (
          SELECT job_id, updated_at, 'expired' AS event, old_token AS token,
                 old_worker AS worker, 1 AS ord
            FROM granted WHERE old_worker IS NOT NULL
          UNION ALL
          SELECT job_id, updated_at, 'leased', token, lease_worker, 2 FROM granted
      ) AS e
     ORDER BY ord
)
SELECT cand.job_id AS candidate, granted.* FROM cand LEFT JOIN granted ON true
"""
    )


CLAIM_ANY = _claim("")
"""Grant the first eligible job (EXPIRED and LEASED logged); ``candidate`` with NULL
columns when that job has no attempts left (the caller fails it and claims again)."""
CLAIM_OF_KINDS = _claim(" AND (kind || '') = ANY(%(kinds)s::text[])")
"""The same, among jobs of ``kinds``. The kind is compared as an expression that no index
covers, on purpose: so the claim walks ``jobs_ready`` (the active jobs, in claim order)
and stops at the first one of those kinds. Compared as the bare column, a prepared
statement's generic plan (or statistics taken while the table was young) chose
``jobs_kind_state``, which holds every job of the kind, finished ones included, and sorted
them all: 1 ms per claim at 2,000 jobs, growing with the ledger, and 20% of the jobs/s of 8
``Worker`` processes (a ``Worker`` always claims by its handlers' kinds)."""

RENEW_NOW = (
    """
WITH renewed AS (
    UPDATE jobs SET lease_expires_at = """
    + NOW
    + " + %(ttl)s, updated_at = "
    + NOW
    + """
     WHERE """
    + FENCE_NOW
    + """
    RETURNING """
    + JOB_COLUMNS
    + """
), logged AS (
    INSERT INTO history (job_id, at, event, token, worker, detail)
    SELECT job_id, updated_at, 'renewed', token, lease_worker, '{}' FROM renewed
)
SELECT * FROM renewed
"""
)

RELEASE_NOW = (
    """
WITH released AS (
    UPDATE jobs
       SET attempts = attempts - 1, lease_worker = NULL, lease_expires_at = NULL,
           run_at = """
    + NOW
    + " + %(delay)s, updated_at = "
    + NOW
    + """
     WHERE """
    + FENCE_NOW
    + """ AND lease_worker = %(worker)s
    RETURNING job_id, token, updated_at
), logged AS (
    INSERT INTO history (job_id, at, event, token, worker, detail)
    SELECT job_id, updated_at, 'released', token, %(worker)s::text, '{}' FROM released
)
SELECT * FROM released
"""
)
"""Release a lease whose stored worker is the lease's (the one the history names)."""

ADVANCE_NOW = (
    """
WITH moved AS (
    UPDATE jobs
       SET state = %(to_state)s,
           lease_worker = CASE WHEN %(ends)s THEN NULL ELSE lease_worker END,
           lease_expires_at = CASE WHEN %(ends)s THEN NULL ELSE lease_expires_at END,
           updated_at = """
    + NOW
    + """
     WHERE """
    + FENCE_NOW
    + """ AND lease_worker = %(worker)s AND kind = %(kind)s AND state = %(from_state)s
    RETURNING job_id, token, updated_at
), logged AS (
    INSERT INTO history (job_id, at, event, token, worker, detail)
    SELECT job_id, updated_at, 'advanced', token, %(worker)s::text, %(detail)s::text
      FROM moved
)
SELECT * FROM moved
"""
)
"""Follow the one edge from ``from_state``, the only state that can reach ``to_state``."""


def _effect_start(job_filter: str) -> str:
    return (
        """
WITH job AS (
    SELECT job_id, token, attempts FROM jobs WHERE """
        + FENCE_NOW
        + job_filter
        + """
       FOR UPDATE
), started AS (
    INSERT INTO effects (op_key, job_id, op, extras, status, started_at, token, started_by)
    SELECT %(op_key)s::text, job_id, %(op)s::text, %(extras)s::text, 'started', """
        + NOW
        + """,
           token, %(worker)s::text
      FROM job
    ON CONFLICT (op_key) DO NOTHING
    RETURNING job_id, token, started_at
), logged AS (
    INSERT INTO history (job_id, at, event, token, worker, detail)
    SELECT job_id, started_at, 'effect_started', token, %(worker)s::text, %(detail)s::text
      FROM started
)
SELECT job.token, job.attempts, started.started_at FROM job LEFT JOIN started ON true
"""
    )


EFFECT_START_NOW = _effect_start("")
"""Record the first start of an op key; a NULL ``started_at`` means a row exists."""
EFFECT_START_THEN_NOW = _effect_start(" AND kind = %(kind)s AND state = ANY(%(states)s::text[])")
"""The same, for ``run_effect(then=...)``: only while the job is in one of ``states``, the
states from which ``advance`` would take or replay ``then`` (no row otherwise, so the
general code raises ``IllegalTransition`` having written nothing)."""

EFFECT_RECORD_NOW = (
    """
WITH job AS (
    SELECT job_id FROM jobs WHERE """
    + FENCE_NOW
    + """
       FOR UPDATE
), recorded AS (
    UPDATE effects
       SET status = 'done', result = %(result)s, finished_at = """
    + NOW
    + """, token = %(token)s
     WHERE op_key = %(op_key)s AND status <> 'done' AND EXISTS (SELECT 1 FROM job)
    RETURNING job_id, finished_at
), logged AS (
    INSERT INTO history (job_id, at, event, token, worker, detail)
    SELECT job_id, finished_at, 'effect_recorded', %(token)s::bigint, %(worker)s::text,
           %(detail)s::text
      FROM recorded
)
SELECT * FROM recorded
"""
)

EFFECT_RECORD_THEN_NOW = (
    """
WITH job AS (
    SELECT job_id FROM jobs WHERE """
    + FENCE_NOW
    + """ AND lease_worker = %(worker)s AND kind = %(kind)s AND state = %(from_state)s
       FOR UPDATE
), recorded AS (
    UPDATE effects
       SET status = 'done', result = %(result)s, finished_at = """
    + NOW
    + """, token = %(token)s
     WHERE op_key = %(op_key)s AND status <> 'done' AND EXISTS (SELECT 1 FROM job)
    RETURNING job_id, finished_at
), moved AS (
    UPDATE jobs
       SET state = %(to_state)s,
           lease_worker = CASE WHEN %(ends)s THEN NULL ELSE lease_worker END,
           lease_expires_at = CASE WHEN %(ends)s THEN NULL ELSE lease_expires_at END,
           updated_at = """
    + NOW
    + """
     WHERE job_id = %(job_id)s AND EXISTS (SELECT 1 FROM recorded)
    RETURNING job_id, token, updated_at
), logged AS (
    INSERT INTO history (job_id, at, event, token, worker, detail)
    SELECT job_id, at, event, token, worker, detail
      FROM (
          SELECT job_id, finished_at AS at, 'effect_recorded' AS event,
                 %(token)s::bigint AS token, %(worker)s::text AS worker,
                 %(op_detail)s::text AS detail, 1 AS ord
            FROM recorded
          UNION ALL
          SELECT job_id, updated_at, 'advanced', token, %(worker)s::text,
                 %(edge_detail)s::text, 2
            FROM moved
      ) AS e
     ORDER BY ord
)
SELECT recorded.finished_at, moved.updated_at FROM recorded LEFT JOIN moved ON true
"""
)
"""``run_effect(then=...)``'s record: the result, fenced, and the one edge from
``from_state`` (the only state that can reach ``to_state``, as in :data:`ADVANCE_NOW`)
taken with it, the two history entries at one time; nothing at all unless the lease is
live, held by ``worker``, the job in ``from_state`` and the op not yet recorded."""

# -- retention (schema version 2) ------------------------------------------------------

TOMBSTONE = "SELECT kind, state, finished_at, pruned_at FROM tombstones WHERE job_id = %(job_id)s"
PRUNED_AMONG = "SELECT job_id FROM tombstones WHERE job_id = ANY(%(ids)s)"
"""Keys of a planning batch that have a tombstone (read in a fresh snapshot, after the
inserts: see INSERT_JOB)."""
UNPLAN = "DELETE FROM jobs WHERE job_id = ANY(%(ids)s)"
_PRUNABLE = """NOT active AND updated_at < %(cutoff)s
   AND NOT (%(keep_failed)s AND state = (SELECT w.failed FROM workflows w WHERE w.name = kind))"""
PRUNABLE = (
    "SELECT seq FROM jobs WHERE seq > %(after)s AND " + _PRUNABLE + " ORDER BY seq LIMIT %(n)s"
)
"""The next batch of prunable jobs in planned order, read before the batch's transaction."""
PRUNE_LOCK = (
    "SELECT "
    + JOB_COLUMNS
    + " FROM jobs WHERE seq = ANY(%(seqs)s) AND "
    + _PRUNABLE
    + " ORDER BY seq FOR UPDATE"
)
"""The batch's jobs that are still prunable, locked until the batch commits."""
PRUNE_EFFECTS = "DELETE FROM effects WHERE job_id = ANY(%(ids)s)"
PRUNE_HISTORY = "DELETE FROM history WHERE job_id = ANY(%(ids)s)"
INSERT_TOMBSTONES = (
    """
INSERT INTO tombstones (job_id, kind, state, finished_at, pruned_at)
SELECT job_id, kind, state, updated_at, """
    + NOW
    + """ FROM jobs WHERE job_id = ANY(%(ids)s)
ON CONFLICT (job_id) DO UPDATE
   SET kind = EXCLUDED.kind, state = EXCLUDED.state, finished_at = EXCLUDED.finished_at,
       pruned_at = EXCLUDED.pruned_at
"""
)
PRUNE_JOBS = "DELETE FROM jobs WHERE job_id = ANY(%(ids)s)"
COUNT_PRUNABLE = (
    "SELECT count(*) AS jobs,"
    " coalesce(sum((SELECT count(*) FROM effects e WHERE e.job_id = j.job_id)), 0) AS effects"
    " FROM (SELECT job_id FROM jobs WHERE " + _PRUNABLE + " ORDER BY seq LIMIT %(n)s) AS j"
)
_FORGETTABLE = """finished_at < %(cutoff)s
   AND NOT (%(keep_failed)s AND state = (SELECT w.failed FROM workflows w WHERE w.name = kind))"""
FORGETTABLE = (
    'SELECT job_id FROM tombstones WHERE job_id COLLATE "C" > %(after)s AND '
    + _FORGETTABLE
    + ' ORDER BY job_id COLLATE "C" LIMIT %(n)s'
)
FORGET = "DELETE FROM tombstones WHERE job_id = ANY(%(ids)s) AND " + _FORGETTABLE
COUNT_FORGETTABLE = "SELECT count(*) AS n FROM tombstones WHERE " + _FORGETTABLE

# -- counts of finished jobs by watermark (impl/postgres/rollup.py) ----------------------

COUNT_MARK = "SELECT seq FROM count_mark WHERE id = 1"
COUNT_MARK_FOR_UPDATE = COUNT_MARK + " FOR UPDATE"
MAX_SEQ = "SELECT coalesce(max(seq), 0) AS seq FROM jobs"
# The active jobs of one workflow by state, counted from the (kind, state) index alone
# (an index-only scan: the visibility map answers for pages nobody changed since the last
# vacuum, so at ten million jobs it reads a few hundred index pages, not one heap page per
# active job). One statement per workflow, with its own kind and states as values: the
# planner then estimates from the column statistics; with the pairs joined in from
# workflow_states it estimated every pair at rows / distinct states (5 million at 10M),
# and the cost that implied switched JIT compilation on (1.4 s at 1M jobs).
ACTIVE_COUNTS = """
SELECT kind, state, count(*) AS n FROM jobs
WHERE kind = %(kind)s AND state = ANY(%(states)s::text[])
GROUP BY kind, state
"""
# The run_at of the oldest eligible job: for each priority among the active jobs (found
# by skipping through the partial index of active jobs, one probe per priority), the
# first eligible job in run_at order. The walk stops at the first eligible job, passing
# only leased or exhausted ones (a few) and never those not yet due.
OLDEST_ELIGIBLE = """
WITH RECURSIVE priorities(p) AS (
    SELECT max(priority) FROM jobs WHERE active
    UNION ALL
    SELECT (SELECT max(priority) FROM jobs WHERE active AND priority < priorities.p)
    FROM priorities WHERE priorities.p IS NOT NULL
)
SELECT min((
    SELECT run_at FROM jobs
    WHERE active AND priority = priorities.p AND run_at <= %(now)s
      AND attempts < max_attempts
      AND (lease_worker IS NULL OR lease_expires_at <= %(now)s)
    ORDER BY run_at LIMIT 1)) AS oldest
FROM priorities WHERE p IS NOT NULL
"""
ROLLUP_COUNTS = "SELECT kind, state, n FROM state_counts WHERE n > 0"
TAIL_COUNTS = """
SELECT kind, state, count(*) AS n FROM jobs WHERE seq > %(mark)s AND NOT active
GROUP BY kind, state
"""
# Pending jobs that finished since: the pending list less the active jobs' numbers (an
# index-only walk of the partial index of active jobs), and only those rows looked up
# (LATERAL, kept from being flattened into a join by OFFSET 0: one index lookup each,
# never a scan of every job).
_PENDING_DONE = """
    SELECT p.seq, j.kind, j.state
    FROM (SELECT seq FROM count_pending EXCEPT SELECT seq FROM jobs WHERE active) AS p
    CROSS JOIN LATERAL (
        SELECT kind, state FROM jobs WHERE jobs.seq = p.seq AND NOT jobs.active
        OFFSET 0) AS j"""
PENDING_DONE_COUNTS = (
    "SELECT kind, state, count(*) AS n FROM (" + _PENDING_DONE + ") AS d GROUP BY kind, state"
)
# Each refresh statement reads one snapshot, so a job is either counted or pending.
FOLD_PENDING_DONE = (
    """
WITH done AS ("""
    + _PENDING_DONE
    + """
), counted AS (
    INSERT INTO state_counts (kind, state, n)
    SELECT kind, state, count(*) FROM done GROUP BY kind, state
    ON CONFLICT (kind, state) DO UPDATE SET n = state_counts.n + EXCLUDED.n
)
DELETE FROM count_pending WHERE seq IN (SELECT seq FROM done)
"""
)
FOLD_RANGE = """
WITH r AS (
    SELECT seq, kind, state, active FROM jobs WHERE seq > %(mark)s AND seq <= %(upto)s
), counted AS (
    INSERT INTO state_counts (kind, state, n)
    SELECT kind, state, count(*) FROM r WHERE NOT active GROUP BY kind, state
    ON CONFLICT (kind, state) DO UPDATE SET n = state_counts.n + EXCLUDED.n
)
INSERT INTO count_pending (seq) SELECT seq FROM r WHERE active
"""
SET_COUNT_MARK = "UPDATE count_mark SET seq = %(upto)s WHERE id = 1"
PENDING_AMONG = "SELECT seq FROM count_pending WHERE seq = ANY(%(seqs)s)"
UNCOUNT = "UPDATE state_counts SET n = n - %(n)s WHERE kind = %(kind)s AND state = %(state)s"
UNPEND_AMONG = "DELETE FROM count_pending WHERE seq = ANY(%(seqs)s)"
PEND_ONE = "INSERT INTO count_pending (seq) VALUES (%(seq)s) ON CONFLICT DO NOTHING"
# -- waiting for work (impl.postgres.pickup) ---------------------------------------------

NOTIFY = "SELECT pg_notify(%(channel)s, %(payload)s)"
"""Wake the ledger's idle workers: sent inside a transaction, delivered only at commit."""

HEALTH_CHECK = "SELECT 1"

TURN_LOCK_TIMEOUT = "SET lock_timeout = '10s'"
"""How long a turn's connection queues for the turn before it looks at its waiters again."""
TURN_TAKE = b"SELECT pg_advisory_lock($1::bigint)"
"""Queue for the turn to hear announcements of single jobs first (a session lock, FIFO).
Sent through libpq directly (``impl.postgres.pickup.Turn``), hence ``$1`` and bytes."""
LOCK_NOT_AVAILABLE = b"55P03"
"""The SQLSTATE of a lock wait that ran out of ``lock_timeout``."""
TURN_GIVE = "SELECT pg_advisory_unlock(%(key)s)"

_NEXT_DUE = (
    """
SELECT min(CASE WHEN lease_worker IS NULL THEN run_at
                ELSE greatest(run_at, lease_expires_at) END) - """
    + NOW
    + """ AS due_in
  FROM jobs WHERE active"""
)
NEXT_DUE = _NEXT_DUE
"""Seconds until the first unfinished job becomes eligible (its run_at, or its lease's
expiry when that is later); <= 0 when one is eligible now, NULL when none is unfinished."""
NEXT_DUE_OF_KINDS = _NEXT_DUE + " AND kind = ANY(%(kinds)s::text[])"


def listen(channel: str) -> sql.Composed:
    """``LISTEN channel``: a channel is an identifier, which no parameter can carry."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel))


# -- circuit breakers (schema version 3, model/breaker.py) -------------------------------

OPEN_BREAKER = """
INSERT INTO breakers (host, worker, state, failures, last_error, opened_at, until_at,
    changed_at, opens)
VALUES (%(host)s, %(worker)s, 'open', %(failures)s, %(last_error)s, %(now)s, %(until)s,
    %(now)s, 1)
ON CONFLICT (host, worker) DO UPDATE SET
    state = 'open', failures = excluded.failures, last_error = excluded.last_error,
    opened_at = excluded.opened_at, until_at = excluded.until_at,
    changed_at = excluded.changed_at, opens = breakers.opens + 1
"""
CLOSE_BREAKER = """
INSERT INTO breakers (host, worker, state, failures, last_error, opened_at, until_at,
    changed_at, opens)
VALUES (%(host)s, %(worker)s, 'closed', %(failures)s, %(last_error)s, NULL, NULL, %(now)s, 0)
ON CONFLICT (host, worker) DO UPDATE SET
    state = 'closed', failures = excluded.failures,
    last_error = coalesce(excluded.last_error, breakers.last_error),
    until_at = NULL, changed_at = excluded.changed_at
"""
# Sorted by code point, as the other backends and the model sort.
BREAKERS = """
SELECT host, worker, state, failures, last_error, opened_at, until_at, changed_at, opens
FROM breakers ORDER BY host COLLATE "C", worker COLLATE "C"
"""
FORGET_BREAKERS = "DELETE FROM breakers WHERE changed_at < %(before)s"
