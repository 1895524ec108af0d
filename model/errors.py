"""The one error hierarchy of jobledger.

Every error a caller can see derives from :class:`JobledgerError`; the backends wrap
driver exceptions (``sqlite3.*``, ``psycopg.*``) into these with ``raise ... from exc``.
Each message says what was asked, what was found, and what to do.

::

    JobledgerError
    ├── LeaseLost                   the lease's token is stale or it expired
    ├── IllegalTransition           not a declared edge (also ValueError)
    ├── IdempotencyConflict         same job key, different payload
    ├── EffectInDoubt               a start of a dead lease and on_doubt="raise"
    ├── EffectResultError           result not JSON or too large (also ValueError)
    ├── UnknownJob                  (also LookupError)
    │   └── JobPruned               the job finished and was pruned; its key is kept
    ├── UnknownWorkflow             (also LookupError)
    ├── WorkflowConflict            same name, different definition
    ├── InvalidWorkflow             a definition that breaks the graph rules (also ValueError)
    ├── InvalidInput                a bad argument (also ValueError)
    │   ├── InvalidIdentity         identity or extras not a mapping of str to scalars
    │   └── InvalidPayload          payload not JSON
    ├── ConfigError                 unknown key, wrong type or impossible value (also ValueError)
    └── StorageError                the database cannot be used
        ├── DatabaseLocked          locked past the busy timeout
        ├── DatabaseCorrupt         not a database, or damaged
        ├── DatabaseFull            disk or page limit reached
        ├── DatabaseReadOnly        the file or connection refuses writes
        └── SchemaVersionError      schema newer than this code
"""

from __future__ import annotations

from datetime import UTC, datetime

from attrs import define, field


class JobledgerError(Exception):
    """Root of every error jobledger raises on purpose."""


@define(eq=False, str=False)
class LeaseLost(JobledgerError):
    """A call carried a lease that is no longer the job's live lease.

    Either the token is stale (someone else was granted the job since, or an operator
    cancelled or retried it), or the lease expired by the store's clock. Nothing was
    changed; the caller must stop working on the job.
    """

    job_id: str
    token: int
    current_token: int | None
    reason: str
    op: str = field(default="")

    def __str__(self) -> str:
        what = f"{self.op} on job {self.job_id}" if self.op else f"job {self.job_id}"
        return (
            f"{what} with lease token {self.token}: {self.reason} "
            f"(current token {self.current_token}); the lease is lost, stop working on "
            "this job and lease another"
        )


class IllegalTransition(JobledgerError, ValueError):
    """A state change that the job's workflow does not declare."""


class IdempotencyConflict(JobledgerError):
    """The job key exists with a different payload than the one asked for."""


@define(eq=False, str=False)
class EffectInDoubt(JobledgerError):
    """An effect was started under a lease that died before its result was recorded.

    Raised by ``run_effect(..., on_doubt="raise")``. Whether the effect happened is
    unknown: probe the world (or pass a callable ``on_doubt``) before running it again.
    """

    job_id: str
    op: str
    op_key: str
    started_token: int
    started_by: str

    def __str__(self) -> str:
        return (
            f"effect {self.op!r} (op key {self.op_key}) of job {self.job_id} is in doubt: it "
            f"was started by {self.started_by!r} under token {self.started_token} and no "
            "result was recorded; check whether it happened, then pass on_doubt='retry' "
            "or a probe callable"
        )


class EffectResultError(JobledgerError, ValueError):
    """An effect returned a result that cannot be recorded (not JSON, or too large)."""


class UnknownJob(JobledgerError, LookupError):
    """No job has the given id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"no job with id {job_id!r} in this store; check the id (64 hex characters, "
            "as returned by plan) and the database you opened"
        )
        self.job_id = job_id


class JobPruned(UnknownJob):
    """The job finished and was removed by ``prune``; only its tombstone is left.

    Planning the same identity again returns this id and changes nothing (the key is
    kept), unless the operator pruned with ``forget_keys``.
    """

    def __init__(
        self, job_id: str, *, kind: str, state: str, finished_at: float, pruned_at: float
    ) -> None:
        LookupError.__init__(
            self,
            f"job {job_id} ({kind}) finished in state {state!r} at {_utc(finished_at)} and "
            f"was pruned at {_utc(pruned_at)}: its rows are gone, only its key is kept "
            "(planning it again changes nothing); read the prune archive for its details, "
            "or prune with --forget-keys to let the identity be planned anew",
        )
        self.job_id = job_id
        self.kind = kind
        self.state = state
        self.finished_at = finished_at
        self.pruned_at = pruned_at


def _utc(seconds: float) -> str:
    """A store time for a message: the seconds and, when they are a date, the UTC time."""
    try:
        stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{seconds}"
    return f"{seconds} ({stamp})"


class UnknownWorkflow(JobledgerError, LookupError):
    """No workflow of that name is registered."""


class WorkflowConflict(JobledgerError):
    """A workflow name is registered with a different definition."""


class InvalidWorkflow(JobledgerError, ValueError):
    """A workflow definition that breaks the graph rules."""


class InvalidInput(JobledgerError, ValueError):
    """An argument that the contract does not accept."""


class InvalidIdentity(InvalidInput):
    """An identity or extras mapping that is not str keys to str/int/bool/None values."""


class InvalidPayload(InvalidInput):
    """A payload that cannot be stored as JSON."""


class ConfigError(JobledgerError, ValueError):
    """A configuration key, type or value that is not accepted."""


class StorageError(JobledgerError):
    """The database cannot be used for the call."""


class DatabaseLocked(StorageError):
    """The database stayed locked past the busy timeout."""


class DatabaseCorrupt(StorageError):
    """The file is not a database, or it is damaged."""


class DatabaseFull(StorageError):
    """The disk or the configured page limit is full."""


class DatabaseReadOnly(StorageError):
    """The database refuses writes (read-only file, mount or connection)."""


class SchemaVersionError(StorageError):
    """The database's schema is newer than this code understands."""
