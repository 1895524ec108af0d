"""jobledger's reference model: the vocabulary and the executable specification.

``model`` owns the records, the error tree, the key encoding, workflows, the ``Store``
protocol and :class:`MemoryStore`, the pure in-memory reference semantics that every
backend in ``impl`` is checked against.
"""

from __future__ import annotations

from model.breaker import BreakerMove, BreakerRow
from model.clock import Clock, ManualClock, wall_clock
from model.config import Config
from model.errors import (
    ConfigError,
    DatabaseCorrupt,
    DatabaseFull,
    DatabaseLocked,
    DatabaseReadOnly,
    EffectInDoubt,
    EffectResultError,
    IdempotencyConflict,
    IllegalTransition,
    InvalidIdentity,
    InvalidInput,
    InvalidPayload,
    InvalidWorkflow,
    JobledgerError,
    JobPruned,
    LeaseLost,
    SchemaVersionError,
    StorageError,
    UnknownJob,
    UnknownWorkflow,
    WorkflowConflict,
)
from model.key import Scalar, canon, job_key, op_key
from model.memory import MemoryStore
from model.record import (
    JSON,
    DoubtInfo,
    EffectContext,
    EffectInfo,
    EffectStatus,
    Event,
    HistoryEvent,
    JobInfo,
    Lease,
    LeaseRow,
    Plan,
    ReconcileReport,
    Stats,
)
from model.retention import (
    PRUNE_BATCH_DEFAULT,
    ArchiveFn,
    ProgressFn,
    PrunedJob,
    PruneReport,
    Tombstone,
    parse_age,
)
from model.store import EffectFn, OnDoubt, Store
from model.workflow import DOWNLOAD, Workflow

__all__ = [
    "DOWNLOAD",
    "JSON",
    "PRUNE_BATCH_DEFAULT",
    "ArchiveFn",
    "BreakerMove",
    "BreakerRow",
    "Clock",
    "Config",
    "ConfigError",
    "DatabaseCorrupt",
    "DatabaseFull",
    "DatabaseLocked",
    "DatabaseReadOnly",
    "DoubtInfo",
    "EffectContext",
    "EffectFn",
    "EffectInDoubt",
    "EffectInfo",
    "EffectResultError",
    "EffectStatus",
    "Event",
    "HistoryEvent",
    "IdempotencyConflict",
    "IllegalTransition",
    "InvalidIdentity",
    "InvalidInput",
    "InvalidPayload",
    "InvalidWorkflow",
    "JobInfo",
    "JobPruned",
    "JobledgerError",
    "Lease",
    "LeaseLost",
    "LeaseRow",
    "ManualClock",
    "MemoryStore",
    "OnDoubt",
    "Plan",
    "ProgressFn",
    "PruneReport",
    "PrunedJob",
    "ReconcileReport",
    "Scalar",
    "SchemaVersionError",
    "Stats",
    "StorageError",
    "Store",
    "Tombstone",
    "UnknownJob",
    "UnknownWorkflow",
    "Workflow",
    "WorkflowConflict",
    "canon",
    "job_key",
    "op_key",
    "parse_age",
    "wall_clock",
]
