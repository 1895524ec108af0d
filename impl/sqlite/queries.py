"""Every SQL statement the SQLite backend runs, as named constants.

Runtime code formats no SQL: values are always bound parameters, and the few statements
that differ only in shape (an optional ``kind`` filter, the sort direction, a pragma
value) are separate constants chosen by name. ``JOB_COLUMNS`` is the one column list that
:func:`impl.sqlite.row.job_row` decodes.
"""

from __future__ import annotations

# -- transactions -----------------------------------------------------------------------

BEGIN_IMMEDIATE = "BEGIN IMMEDIATE"
BEGIN_DEFERRED = "BEGIN DEFERRED"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
# One member's writes inside a group transaction (impl.sqlite.group): a member's error
# rolls back to its savepoint, leaving the other members' writes in the transaction.
SAVEPOINT_MEMBER = "SAVEPOINT member"
RELEASE_MEMBER = "RELEASE member"
ROLLBACK_TO_MEMBER = "ROLLBACK TO member"

# -- pragmas (applied on every connection) ----------------------------------------------

PRAGMA_JOURNAL_WAL = "PRAGMA journal_mode = WAL"
# The page size of a new database file (an existing file keeps its own: the pragma does
# nothing there). Every commit writes whole pages to the WAL, and a job ledger's commits
# change a row or two each: with 2 KiB pages instead of SQLite's default 4 KiB, the
# lease-effect-advance lifecycle ran 5-9% faster and one of bigger rows (URLs, payloads,
# results of a few hundred bytes) about 4%, for a 7% slower bulk insert; 1 KiB pages
# lost on the bigger rows, whose cells no longer fit in a page. Measured by
# `python -m bench --only page_size` (bench/README.md, "Page size").
NEW_FILE_PAGE_SIZE = 2048
PRAGMA_PAGE_SIZE = f"PRAGMA page_size = {NEW_FILE_PAGE_SIZE}"
PRAGMA_FOREIGN_KEYS_ON = "PRAGMA foreign_keys = ON"
PRAGMA_SYNCHRONOUS = {
    "OFF": "PRAGMA synchronous = OFF",
    "NORMAL": "PRAGMA synchronous = NORMAL",
    "FULL": "PRAGMA synchronous = FULL",
    "EXTRA": "PRAGMA synchronous = EXTRA",
}
PRAGMA_BUSY_TIMEOUT_QUERY = "PRAGMA busy_timeout"
# Writers checkpoint the WAL themselves only when it passes this many pages (40 MB at
# the default page size); the store's checkpointer thread does it long before.
PRAGMA_WAL_AUTOCHECKPOINT = "PRAGMA wal_autocheckpoint = 10000"
CHECKPOINT_PASSIVE = "PRAGMA wal_checkpoint(PASSIVE)"

# -- schema bookkeeping -----------------------------------------------------------------

MIGRATIONS_TABLE_EXISTS = (
    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
)
SELECT_SCHEMA_VERSION = "SELECT max(version) FROM schema_migrations"
CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
)
"""
INSERT_MIGRATION = "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)"

# -- workflows --------------------------------------------------------------------------

SELECT_WORKFLOWS = "SELECT name, definition FROM workflows ORDER BY name"
SELECT_WORKFLOW = "SELECT definition FROM workflows WHERE name = ?"
INSERT_WORKFLOW = "INSERT INTO workflows (name, definition, initial, failed) VALUES (?, ?, ?, ?)"
INSERT_WORKFLOW_STATE = "INSERT INTO workflow_states (kind, state, terminal) VALUES (?, ?, ?)"
INSERT_WORKFLOW_EDGE = "INSERT INTO workflow_edges (kind, src, dst) VALUES (?, ?, ?)"

# -- jobs -------------------------------------------------------------------------------

JOB_COLUMNS = (
    "job_id, kind, identity, payload, state, attempts, max_attempts, priority, run_at, "
    "token, lease_worker, lease_expires_at, last_error, failed_from, created_at, "
    "updated_at, seq"
)

SELECT_JOB = "SELECT " + JOB_COLUMNS + " FROM jobs WHERE job_id = ?"
SELECT_JOB_STATE = "SELECT state FROM jobs WHERE job_id = ?"
JOB_EXISTS = "SELECT 1 FROM jobs WHERE job_id = ?"
# The stored payloads of a batch of job ids (a JSON array): one statement for a whole
# plan_many instead of one lookup per item. plan_many's fast path inserts first, and
# ``:last_seq`` (the last row before it, or NULL for no limit) tells the rows planned
# earlier from the ones it just inserted.
SELECT_PAYLOADS = """
SELECT job_id, payload FROM jobs
WHERE job_id IN (SELECT value FROM json_each(:ids)) AND (:last_seq IS NULL OR seq <= :last_seq)
"""
SELECT_LAST_SEQ = "SELECT ifnull(max(seq), 0) FROM jobs"

# seq is the rowid: SQLite numbers each new row max(seq) + 1, in insertion order.
# The PLANNED entry is the job's first row entry (hist_n = 1), implied by created_at and
# not written out (see read.history and schema version 4).
# A key with a tombstone (its job was pruned, see schema version 5) is not planned again.
INSERT_JOB = """
INSERT INTO jobs (
    job_id, kind, identity, payload, state, terminal, attempts, max_attempts,
    priority, run_at, token, created_at, updated_at, hist, hist_n
) SELECT ?1, ?2, ?3, ?4, ?5, 0, 0, ?6, ?7, ?8, 0, ?9, ?10, '', 1
WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE job_id = ?1)
ON CONFLICT (job_id) DO NOTHING
"""

# What every lease-taking call reads to fence a lease (and to explain a refusal): the
# few columns its decision needs, not the whole row.
SELECT_FENCE = """
SELECT token, lease_worker, lease_expires_at, attempts, max_attempts, state, kind
FROM jobs WHERE job_id = ?
"""

# History positions (schema version 3): the job's n-th entry written through its row is at
# n * HISTORY_GAP (``jobs.hist_n`` counts them); an effect's entries, which do not write
# the job's row, take the next free position after the last of those, so they sort
# between the row entries around them. HISTORY_GAP leaves room for 2**32 - 1 effect
# entries between two row entries, and 2**31 row entries per job.
HISTORY_GAP = 1 << 32
_GAP = str(HISTORY_GAP)
# An entry appended inline to the job's row as the JSON line ``{line}`` (``[at, event,
# token, worker, detail]``); its position is implied: the inline lines are the job's last
# row entries, the last one at hist_n * HISTORY_GAP. Statements that append return the
# new length of the text, and the store moves the entries to the history table once it
# is long (connection.Tx.spill_if_long), so a job renewed for hours keeps a short row.
# Advances alone do not check (RETURNING costs SQLite a temporary table per statement,
# 5 us of an advance's 25 here): a job advances at most once per edge of its workflow
# between two claims, so they add a bounded few lines before the next claim, renewal or
# other entry checks.
_ROW_ENTRY = "hist_n = hist_n + 1, hist = hist || {line}"
ROW_ENTRY = _ROW_ENTRY.format(line=":line")

# lease_next's candidate: the first eligible row (no lease, or an expired one), walking
# the partial index jobs_active (every non-terminal job) in lease_next's own order. The
# index does not hold the lease columns, so granting or ending a lease never writes it:
# live leases are skipped by reading their rows, and there are at most as many of those
# ahead of the first eligible job as there are live workers.
_FIRST_ELIGIBLE = """
    SELECT seq FROM jobs INDEXED BY jobs_active
    WHERE terminal = 0 AND run_at <= :now
      AND (lease_worker IS NULL OR lease_expires_at <= :now)"""
# A filter on the kinds: one kind is compared directly (a list read by json_each is made
# into a table on every execution, about 10 us per claim).
_OF_KIND = """
      AND kind = :kind"""
_OF_KINDS = """
      AND kind IN (SELECT value FROM json_each(:kinds))"""
_IN_ORDER = """
    ORDER BY priority DESC, run_at, seq LIMIT 1"""
SELECT_CANDIDATE = (
    "SELECT " + JOB_COLUMNS + " FROM jobs WHERE seq = (" + _FIRST_ELIGIBLE + _IN_ORDER + ")"
)
SELECT_CANDIDATE_OF_KIND = (
    "SELECT "
    + JOB_COLUMNS
    + " FROM jobs WHERE seq = ("
    + _FIRST_ELIGIBLE
    + _OF_KIND
    + _IN_ORDER
    + ")"
)
SELECT_CANDIDATE_OF_KINDS = (
    "SELECT "
    + JOB_COLUMNS
    + " FROM jobs WHERE seq = ("
    + _FIRST_ELIGIBLE
    + _OF_KINDS
    + _IN_ORDER
    + ")"
)

# lease_next's fast path, one statement: grant the first eligible job when it is unleased
# and has attempts left. Whenever it updates nothing, the store takes the general path
# (an expired lease is ended and recorded, an exhausted job failed), which starts from
# the same candidate.
# The grant writes its own LEASED entry (the new token is only known in the statement).
_CLAIM = (
    """
UPDATE jobs SET token = token + 1, attempts = attempts + 1, lease_worker = :worker,
    lease_expires_at = :expires_at, updated_at = :now, """
    + _ROW_ENTRY.format(
        line="'[' || :at || ',\"leased\",' || (token + 1) || ',' || :worker_text || ',{{}}]'"
        " || char(10)"
    )
    + """
WHERE seq = ({candidate})
  AND lease_worker IS NULL AND attempts < max_attempts
RETURNING job_id, kind, identity, payload, state, token, attempts, length(hist)
"""
)
CLAIM_FIRST = _CLAIM.format(candidate=_FIRST_ELIGIBLE + _IN_ORDER)
CLAIM_FIRST_OF_KIND = _CLAIM.format(candidate=_FIRST_ELIGIBLE + _OF_KIND + _IN_ORDER)
CLAIM_FIRST_OF_KINDS = _CLAIM.format(candidate=_FIRST_ELIGIBLE + _OF_KINDS + _IN_ORDER)

GRANT_LEASE = """
UPDATE jobs SET token = token + 1, attempts = attempts + 1, lease_worker = :worker,
    lease_expires_at = :expires_at, updated_at = :now
WHERE job_id = :job_id AND token = :token
RETURNING token, attempts
"""
# The fencing check is part of the update: it changes the row only under a live lease
# of that token, and the store reads the row only to explain a refusal.
RENEW_LEASE = """
UPDATE jobs SET lease_expires_at = :expires_at, updated_at = :now
WHERE job_id = :job_id AND token = :token
  AND lease_worker IS NOT NULL AND lease_expires_at > :now
RETURNING kind, identity, payload, state, attempts, lease_worker
"""
RELEASE_LEASE = """
UPDATE jobs SET attempts = attempts - 1, lease_worker = NULL, lease_expires_at = NULL,
    run_at = :run_at, updated_at = :now
WHERE job_id = :job_id AND token = :token
"""
# An advance changes the row only if the job is still in :from_state under the live lease
# of :token held by :worker: the usual advance (from the state the job was leased in) is
# then this one statement, and the general path passes what it has just read and fenced.
_ADVANCE_WHERE = """
WHERE job_id = :job_id AND token = :token AND kind = :kind AND state = :from_state
  AND lease_worker = :worker AND lease_expires_at > :now
"""
ADVANCE_KEEP_LEASE = (
    """
UPDATE jobs SET state = :state, updated_at = :now, """
    + ROW_ENTRY
    + _ADVANCE_WHERE
)
ADVANCE_TO_TERMINAL = (
    """
UPDATE jobs SET state = :state, terminal = 1, lease_worker = NULL, lease_expires_at = NULL,
    updated_at = :now, """
    + ROW_ENTRY
    + _ADVANCE_WHERE
)
RETRY_LATER = """
UPDATE jobs SET lease_worker = NULL, lease_expires_at = NULL, run_at = :run_at,
    last_error = :error, updated_at = :now
WHERE job_id = :job_id AND token = :token
"""
# SET expressions read the old row, so failed_from = state keeps the state left behind.
ENTER_FAILED = """
UPDATE jobs SET state = :failed, terminal = 1, failed_from = state, last_error = :error,
    lease_worker = NULL, lease_expires_at = NULL, updated_at = :now
WHERE job_id = :job_id AND terminal = 0
"""
CANCEL_JOB = """
UPDATE jobs SET state = :failed, terminal = 1, failed_from = state, last_error = :error,
    token = token + 1, lease_worker = NULL, lease_expires_at = NULL, updated_at = :now
WHERE job_id = :job_id AND terminal = 0
RETURNING token
"""
RETRY_JOB = """
UPDATE jobs SET state = failed_from, terminal = 0, attempts = 0, token = token + 1,
    run_at = :now, lease_worker = NULL, lease_expires_at = NULL, updated_at = :now
WHERE job_id = :job_id AND state = :failed
RETURNING token, state
"""
EXPIRE_LEASE = """
UPDATE jobs SET lease_worker = NULL, lease_expires_at = NULL, updated_at = :now
WHERE job_id = :job_id AND token = :token
"""

# -- reconcile --------------------------------------------------------------------------

SELECT_EXPIRED_LEASES = """
SELECT job_id, token, lease_worker FROM jobs INDEXED BY jobs_active
WHERE terminal = 0 AND lease_worker IS NOT NULL AND lease_expires_at <= :now
ORDER BY lease_expires_at, seq
"""
COUNT_EXPIRED_LEASES = """
SELECT count(*) FROM jobs INDEXED BY jobs_active
WHERE terminal = 0 AND lease_worker IS NOT NULL AND lease_expires_at <= :now
"""
# A start is dead when its token is no longer the job's, or the job has no live lease.
# Dead starts are found in two places, never by reading every effect: those whose lease
# ended or whose token moved on carry doubt = 1 (the trigger effects_doubt_when_lease_ends
# sets it), and those whose lease merely ran out are under an expired lease, among the
# active jobs.
_DEAD_STARTS_MARKED = """
SELECT e.op_key, e.job_id, e.op, e.token, e.started_by, j.token AS job_token,
    j.seq AS job_seq, e.seq AS effect_seq
FROM effects AS e INDEXED BY effects_doubt JOIN jobs AS j ON j.job_id = e.job_id
WHERE e.doubt = 1 AND e.status = 'started'
"""
_DEAD_STARTS_EXPIRED = """
SELECT e.op_key, e.job_id, e.op, e.token, e.started_by, j.token, j.seq, e.seq
FROM jobs AS j INDEXED BY jobs_active JOIN effects AS e ON e.job_id = j.job_id
WHERE j.terminal = 0 AND j.lease_worker IS NOT NULL AND j.lease_expires_at <= :now
  AND e.status = 'started' AND e.doubt = 0
"""
_DEAD_STARTS = _DEAD_STARTS_MARKED + "UNION ALL" + _DEAD_STARTS_EXPIRED
SELECT_DEAD_STARTS = (
    "SELECT op_key, job_id, op, token, started_by, job_token FROM ("
    + _DEAD_STARTS
    + ") ORDER BY job_seq, effect_seq"
)
COUNT_DEAD_STARTS = "SELECT count(*) FROM (" + _DEAD_STARTS + ")"
SELECT_EXHAUSTED = """
SELECT job_id, kind, token, attempts, max_attempts FROM jobs
WHERE terminal = 0 AND ifnull(lease_expires_at, :now) <= :now AND attempts >= max_attempts
ORDER BY seq
"""
COUNT_EXHAUSTED = """
SELECT count(*) FROM jobs
WHERE terminal = 0 AND ifnull(lease_expires_at, :now) <= :now AND attempts >= max_attempts
"""

# -- effects ----------------------------------------------------------------------------

# The position of the job :job_id's next effect entry: three short seeks, all reads.
_NEXT_EFFECT_POSITION = (
    """(
    SELECT 1 + max(
        j.hist_n * """
    + _GAP
    + """,
        ifnull((SELECT max(max(ifnull(e.start_n, 0), ifnull(e.finish_n, 0)))
                FROM effects AS e WHERE e.job_id = :job_id), 0),
        ifnull((SELECT max(h.id) FROM history AS h WHERE h.job_id = :job_id), 0))
    FROM jobs AS j WHERE j.job_id = :job_id)"""
)

EFFECT_COLUMNS = (
    "op_key, job_id, op, extras, status, result, started_at, finished_at, token, started_by"
)
SELECT_EFFECT = "SELECT " + EFFECT_COLUMNS + " FROM effects WHERE job_id = ? AND op_key = ?"
SELECT_EFFECTS_OF_JOB = "SELECT " + EFFECT_COLUMNS + " FROM effects WHERE job_id = ? ORDER BY seq"
# An effect's start: the row is inserted only under the job's live lease of :token in
# attempt :attempt (the lease's own: a job's attempts change only with a new token or
# with the lease's end), so the usual start needs no fence read and returns nothing
# (RETURNING costs SQLite a temporary table per statement: 5 us of the insert's 30
# here). Nothing is inserted when the lease is not live, the attempt is not the job's,
# or the op has a row already (recorded, or a start left in doubt); the store then reads
# the fence to say why, or the row to replay or resolve it. seq numbers a job's effects
# in first-start order (a scan of that job's few rows, in the page being written).
START_EFFECT_FENCED = (
    """
INSERT INTO effects (
    job_id, op_key, op, extras, status, result, started_at, finished_at, token,
    started_by, seq, start_n, attempt
)
SELECT :job_id, :op_key, :op, :extras, 'started', NULL, :now, NULL, :token, :worker,
    (SELECT ifnull(max(seq), 0) + 1 FROM effects WHERE job_id = :job_id),
    """
    + _NEXT_EFFECT_POSITION
    + """,
    j.attempts
FROM jobs AS j
WHERE j.job_id = :job_id AND j.token = :token AND j.attempts = :attempt
  AND j.lease_worker IS NOT NULL AND j.lease_expires_at > :now
ON CONFLICT DO NOTHING
"""
)
# The entries an effect row carries are copied to the history table before the row is
# changed in a way that would lose them (see schema version 3). Each statement copies
# from the rows the change that follows it will touch, under the same conditions.
COPY_START_OUT = """
INSERT INTO history (job_id, id, at, event, token, worker, detail)
SELECT job_id, start_n, started_at, 'effect_started', token, started_by, :detail
FROM effects
WHERE job_id = :job_id AND op_key = :op_key AND start_n IS NOT NULL
  AND (:token IS NULL OR (status = 'started' AND token = :token))
"""
COPY_FINISH_OUT = """
INSERT INTO history (job_id, id, at, event, token, worker, detail)
SELECT job_id, finish_n, finished_at, 'effect_recorded', token, started_by, :detail
FROM effects
WHERE job_id = :job_id AND op_key = :op_key AND finish_n IS NOT NULL
"""
RESTART_EFFECT = """
UPDATE effects SET status = 'started', result = NULL, started_at = :now,
    finished_at = NULL, token = :token, started_by = :worker, start_n = NULL,
    finish_n = NULL, doubt = 0, attempt = :attempt
WHERE job_id = :job_id AND op_key = :op_key AND status != 'done'
"""
DELETE_OWN_START = """
DELETE FROM effects
WHERE job_id = :job_id AND op_key = :op_key AND status = 'started' AND token = :token
"""
MARK_START_IN_DOUBT = """
UPDATE effects SET status = 'in_doubt', doubt = 1
WHERE job_id = :job_id AND op_key = :op_key AND status = 'started' AND token = :token
"""
# Recording is fenced in the update itself: it changes the row only while the job's
# lease of that token is live; the store reads the job only to explain a refusal. The
# RECORDED entry is the row's own (finish_n) when the same token started it, which the
# usual path guarantees; a probed result copies the start out and writes its entries.
RECORD_EFFECT = (
    """
UPDATE effects SET status = 'done', result = :result, finished_at = :now, token = :token,
    doubt = 0, finish_n = CASE WHEN :inline THEN """
    + _NEXT_EFFECT_POSITION
    + """ END
WHERE job_id = :job_id AND op_key = :op_key AND status != 'done'
  AND EXISTS (
    SELECT 1 FROM jobs WHERE job_id = :job_id AND token = :token
      AND lease_worker IS NOT NULL AND lease_expires_at > :now)
"""
)
CLEAR_START_N = """
UPDATE effects SET start_n = NULL WHERE job_id = :job_id AND op_key = :op_key
"""

# -- history ----------------------------------------------------------------------------

# The inline text is moved to the history table once it is longer than this.
INLINE_HISTORY_LIMIT = 2048
APPEND_HISTORY = "UPDATE jobs SET " + ROW_ENTRY + " WHERE job_id = :job_id RETURNING length(hist)"
CLEAR_INLINE_HISTORY = "UPDATE jobs SET hist = '' WHERE job_id = ?"
INSERT_HISTORY_ROW = """
INSERT INTO history (job_id, id, at, event, token, worker, detail) VALUES (?, ?, ?, ?, ?, ?, ?)
"""
SELECT_HISTORY = "SELECT id, at, event, token, worker, detail FROM history WHERE job_id = ?"
SELECT_INLINE_HISTORY = "SELECT hist, hist_n FROM jobs WHERE job_id = ?"
SELECT_ROW_HISTORY = "SELECT hist, hist_n, created_at FROM jobs WHERE job_id = ?"
SELECT_EFFECT_ENTRIES = """
SELECT start_n, started_at, finish_n, finished_at, token, started_by, op FROM effects
WHERE job_id = ? AND (start_n IS NOT NULL OR finish_n IS NOT NULL)
"""

# -- listings and stats -----------------------------------------------------------------

SELECT_JOBS = (
    "SELECT " + JOB_COLUMNS + " FROM jobs"
    " WHERE (:state IS NULL OR state = :state) AND (:kind IS NULL OR kind = :kind)"
    " ORDER BY seq LIMIT :limit"
)
SELECT_JOBS_NEWEST_FIRST = (
    "SELECT " + JOB_COLUMNS + " FROM jobs"
    " WHERE (:state IS NULL OR state = :state) AND (:kind IS NULL OR kind = :kind)"
    " ORDER BY seq DESC LIMIT :limit"
)
SELECT_LEASES = """
SELECT job_id, kind, state, lease_worker, token, lease_expires_at FROM jobs INDEXED BY jobs_active
WHERE terminal = 0 AND lease_worker IS NOT NULL ORDER BY lease_expires_at, job_id
"""
# In-doubt effects for stats, in two parts: those marked (doubt = 1: in doubt, or
# started under a lease that ended or a token that moved on), a walk of effects_doubt;
# and starts under a lease that merely expired, which walks every active job, so stats
# runs it only when its own walk of them found an expired lease (at 10M jobs with 100,000
# active that walk is half of what stats reads).
COUNT_IN_DOUBT_MARKED = (
    "SELECT (SELECT count(*) FROM effects INDEXED BY effects_doubt"
    " WHERE doubt = 1 AND status = 'in_doubt') + (SELECT count(*) FROM ("
    + _DEAD_STARTS_MARKED
    + "))"
)
COUNT_DEAD_STARTS_EXPIRED = "SELECT count(*) FROM (" + _DEAD_STARTS_EXPIRED + ")"
# The active jobs' part of the stats in one walk of the partial index of active jobs, by
# kind and state: their counts, live and expired leases, and the run_at of the oldest
# eligible job.
ACTIVE_SUMMARY = """
SELECT kind, state, count(*),
    ifnull(sum(lease_worker IS NOT NULL AND lease_expires_at > :now), 0),
    ifnull(sum(lease_worker IS NOT NULL AND lease_expires_at <= :now), 0),
    min(CASE WHEN run_at <= :now AND ifnull(lease_expires_at, :now) <= :now
             AND attempts < max_attempts THEN run_at END)
FROM jobs INDEXED BY jobs_active WHERE terminal = 0
GROUP BY kind, state
"""

# -- retention (schema version 5) -------------------------------------------------------

SELECT_TOMBSTONE = "SELECT kind, state, finished_at, pruned_at FROM tombstones WHERE job_id = ?"
SELECT_TOMBSTONED = (
    "SELECT job_id FROM tombstones WHERE job_id IN (SELECT value FROM json_each(:ids))"
)
# What prune may remove: terminal jobs that finished (their last update) before :cutoff,
# and with :keep_failed not those in their workflow's failed state.
_PRUNABLE = """terminal = 1 AND updated_at < :cutoff
  AND NOT (:keep_failed AND state = (SELECT w.failed FROM workflows AS w WHERE w.name = kind))"""
# The next batch of prunable jobs after :after in planned order, read without the write
# lock (a walk of the rowid from where the last batch ended); the batch's transaction
# reads them again by seq and deletes only those still prunable.
SELECT_PRUNABLE = (
    "SELECT seq FROM jobs WHERE seq > :after AND " + _PRUNABLE + " ORDER BY seq LIMIT :n"
)
_BATCH = "seq IN (SELECT value FROM json_each(:seqs)) AND " + _PRUNABLE
SELECT_PRUNE_BATCH = "SELECT seq, job_id, kind, state FROM jobs WHERE " + _BATCH + " ORDER BY seq"
SELECT_PRUNE_ROWS = "SELECT " + JOB_COLUMNS + " FROM jobs WHERE " + _BATCH + " ORDER BY seq"
DELETE_PRUNED_EFFECTS = "DELETE FROM effects WHERE job_id IN (SELECT value FROM json_each(:ids))"
DELETE_PRUNED_HISTORY = "DELETE FROM history WHERE job_id IN (SELECT value FROM json_each(:ids))"
INSERT_TOMBSTONES = """
INSERT INTO tombstones (job_id, kind, state, finished_at, pruned_at)
SELECT job_id, kind, state, updated_at, :now FROM jobs
WHERE seq IN (SELECT value FROM json_each(:seqs))
"""
DELETE_PRUNED_JOBS = "DELETE FROM jobs WHERE seq IN (SELECT value FROM json_each(:seqs))"
COUNT_PRUNABLE = (
    "SELECT count(*), ifnull(sum((SELECT count(*) FROM effects AS e WHERE e.job_id = j.job_id)), 0)"
    " FROM (SELECT job_id FROM jobs WHERE " + _PRUNABLE + " ORDER BY seq LIMIT :n) AS j"
)
# Tombstones that forget_keys removes: finished before :cutoff (failed ones kept with
# :keep_failed), in key order from :after.
_FORGETTABLE = """finished_at < :cutoff
  AND NOT (:keep_failed AND state = (SELECT w.failed FROM workflows AS w WHERE w.name = kind))"""
SELECT_FORGETTABLE = (
    "SELECT job_id FROM tombstones WHERE job_id > :after AND "
    + _FORGETTABLE
    + " ORDER BY job_id LIMIT :n"
)
DELETE_TOMBSTONES = (
    "DELETE FROM tombstones WHERE job_id IN (SELECT value FROM json_each(:ids)) AND " + _FORGETTABLE
)
COUNT_FORGETTABLE = "SELECT count(*) FROM tombstones WHERE " + _FORGETTABLE
# Space: with auto_vacuum = INCREMENTAL (new files, see connection.open_connection) the
# free pages a prune leaves are given back to the file system a chunk at a time.
PRAGMA_AUTO_VACUUM_INCREMENTAL = "PRAGMA auto_vacuum = INCREMENTAL"
PRAGMA_AUTO_VACUUM = "PRAGMA auto_vacuum"
PRAGMA_PAGE_COUNT = "PRAGMA page_count"
PRAGMA_FREELIST_COUNT = "PRAGMA freelist_count"
# Pages freed per vacuum transaction: a few MB, so each holds the write lock briefly.
VACUUM_CHUNK_PAGES = 1024
"""The most pages one incremental vacuum transaction frees."""
INCREMENTAL_VACUUM_PAGE = "PRAGMA incremental_vacuum"
"""Frees one page per run: each step of the pragma frees one page, and Python's sqlite3
steps a statement without result columns once per execute (``fetchall`` adds nothing),
so a chunk of n pages is this statement run n times (``executemany``, about 10 us a page
here). Until this was found, every vacuum transaction freed a single page."""

CHECKPOINT_TRUNCATE = "PRAGMA wal_checkpoint(TRUNCATE)"

# -- counts of finished jobs by watermark (schema version 5, impl/sqlite/rollup.py) -------

SELECT_COUNT_MARK = "SELECT seq FROM count_mark WHERE id = 1"
SELECT_MAX_SEQ = "SELECT ifnull(max(seq), 0) FROM jobs"
ROLLUP_COUNTS = "SELECT kind, state, n FROM state_counts WHERE n > 0"
# Finished jobs past the watermark: a walk of the rowid from it.
TAIL_COUNTS = """
SELECT kind, state, count(*) FROM jobs WHERE seq > :mark AND terminal = 1
GROUP BY kind, state
"""
# Pending jobs (behind the watermark, not in the counts) that have finished since: the
# pending list less the active jobs (both walked from their keys alone, no row read),
# then only those rows looked up. CROSS JOIN keeps that order (SQLite joins as written).
_PENDING_DONE = """
    SELECT seq FROM count_pending
    EXCEPT SELECT seq FROM jobs INDEXED BY jobs_active WHERE terminal = 0"""
PENDING_DONE_COUNTS = (
    "SELECT j.kind, j.state, count(*) FROM ("
    + _PENDING_DONE
    + ") AS p CROSS JOIN jobs AS j ON j.seq = p.seq WHERE j.terminal = 1"
    " GROUP BY j.kind, j.state"
)
_ADD_COUNTS = """
INSERT INTO state_counts (kind, state, n) {select}
ON CONFLICT (kind, state) DO UPDATE SET n = n + excluded.n
"""
FOLD_PENDING_DONE = _ADD_COUNTS.format(select=PENDING_DONE_COUNTS.strip())
# A pending job that is not active has finished (or was deleted, which prune handles).
DROP_PENDING_DONE = "DELETE FROM count_pending WHERE seq IN (" + _PENDING_DONE + ")"
FOLD_RANGE = _ADD_COUNTS.format(
    select="SELECT kind, state, count(*) FROM jobs"
    " WHERE seq > :mark AND seq <= :upto AND terminal = 1 GROUP BY kind, state"
)
PEND_RANGE = """
INSERT INTO count_pending (seq)
SELECT seq FROM jobs WHERE seq > :mark AND seq <= :upto AND terminal = 0
"""
SET_COUNT_MARK = "UPDATE count_mark SET seq = :upto WHERE id = 1"
# After a delete: the watermark never stays above the last job, so a job planned later
# (numbered after the last one) is always past it.
LOWER_COUNT_MARK = (
    "UPDATE count_mark SET seq = min(seq, (SELECT ifnull(max(seq), 0) FROM jobs)) WHERE id = 1"
)
SELECT_PENDING_AMONG = (
    "SELECT seq FROM count_pending WHERE seq IN (SELECT value FROM json_each(:seqs))"
)
UNCOUNT = "UPDATE state_counts SET n = n - :n WHERE kind = :kind AND state = :state"
UNPEND_AMONG = "DELETE FROM count_pending WHERE seq IN (SELECT value FROM json_each(:seqs))"
PEND_ONE = "INSERT OR IGNORE INTO count_pending (seq) VALUES (:seq)"
IS_PENDING = "SELECT 1 FROM count_pending WHERE seq = :seq"
# -- waiting for work (impl.sqlite.pickup) ----------------------------------------------

# Bumped whenever another connection commits (any connection but the one asking).
DATA_VERSION = "PRAGMA data_version"
# When the first unfinished job becomes eligible by the clock: its run_at, or its lease's
# expiry when that is later. It walks only the unfinished jobs (the partial index).
_NEXT_DUE = """
SELECT min(CASE WHEN lease_worker IS NULL THEN run_at
                ELSE max(run_at, lease_expires_at) END)
FROM jobs INDEXED BY jobs_active WHERE terminal = 0"""
NEXT_DUE = _NEXT_DUE
NEXT_DUE_OF_KIND = _NEXT_DUE + _OF_KIND
NEXT_DUE_OF_KINDS = _NEXT_DUE + _OF_KINDS

# -- circuit breakers (schema version 6, model/breaker.py) -------------------------------

BREAKER_COLUMNS = (
    "host, worker, state, failures, last_error, opened_at, until_at, changed_at, opens"
)
OPEN_BREAKER = """
INSERT INTO breakers (host, worker, state, failures, last_error, opened_at, until_at,
    changed_at, opens)
VALUES (:host, :worker, 'open', :failures, :last_error, :now, :until, :now, 1)
ON CONFLICT (host, worker) DO UPDATE SET
    state = 'open', failures = excluded.failures, last_error = excluded.last_error,
    opened_at = excluded.opened_at, until_at = excluded.until_at,
    changed_at = excluded.changed_at, opens = breakers.opens + 1
"""
CLOSE_BREAKER = """
INSERT INTO breakers (host, worker, state, failures, last_error, opened_at, until_at,
    changed_at, opens)
VALUES (:host, :worker, 'closed', :failures, :last_error, NULL, NULL, :now, 0)
ON CONFLICT (host, worker) DO UPDATE SET
    state = 'closed', failures = excluded.failures,
    last_error = coalesce(excluded.last_error, breakers.last_error),
    until_at = NULL, changed_at = excluded.changed_at
"""
SELECT_BREAKERS = "SELECT " + BREAKER_COLUMNS + " FROM breakers ORDER BY host, worker"
DELETE_BREAKERS_BEFORE = "DELETE FROM breakers WHERE changed_at < ?"
