"""Exit codes of the ``jobledger`` command, and the one table mapping errors to them.

| code | meaning |
|---|---|
| 0 | success |
| 1 | the work finished with failed jobs (and ``migrate --check``: migrations pending) |
| 2 | bad usage or bad input: a clear message naming the file, line or key |
| 3 | the database cannot be used: missing, locked past the busy timeout, corrupt, newer |
| 4 | ``download`` stopped: the machine refused a write (full disk or quota, read-only |
|   | file system, no file handles, full or read-only ledger); nothing is lost, no attempt |
|   | was spent: fix what the one-line message names and run the same command again |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

from impl.world import EnvironmentFault
from model.errors import (
    ConfigError,
    IdempotencyConflict,
    IllegalTransition,
    InvalidInput,
    InvalidWorkflow,
    JobledgerError,
    StorageError,
    UnknownJob,
    UnknownWorkflow,
    WorkflowConflict,
)

OK = 0
FAILED_JOBS = 1
PENDING_MIGRATIONS = 1
BAD_INPUT = 2
DATABASE_UNUSABLE = 3
WORLD_REFUSED = 4
INTERRUPTED = 130

_CODES: tuple[tuple[type[JobledgerError], int], ...] = (
    (EnvironmentFault, WORLD_REFUSED),
    (StorageError, DATABASE_UNUSABLE),
    (ConfigError, BAD_INPUT),
    (InvalidInput, BAD_INPUT),
    (UnknownJob, BAD_INPUT),
    (UnknownWorkflow, BAD_INPUT),
    (IllegalTransition, BAD_INPUT),
    (WorkflowConflict, BAD_INPUT),
    (InvalidWorkflow, BAD_INPUT),
    (IdempotencyConflict, BAD_INPUT),
)
"""First match wins. Anything else a command lets through (a lease lost by a worker, an
effect in doubt) means the work did not finish: exit 1."""


def exit_code(error: JobledgerError) -> int:
    """Return the exit code for an expected error."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return FAILED_JOBS


def one_line(error: BaseException) -> str:
    """Return the error's message on one line, for stderr."""
    text = " ".join(str(error).split())
    return text or type(error).__name__
