"""Retention: what ``prune`` removes, what it keeps of a pruned job, and what it reports.

A ledger keeps every finished job's row, effects and history until an operator prunes
them. ``prune`` removes terminal jobs that finished before a cutoff, in batches of
``batch_size`` jobs in planned order, each batch one short transaction. Of every pruned
job it keeps a :class:`Tombstone` (the key, the kind, the final state and when it
finished), so that planning the same identity again stays a no-op: pruning never lets
finished work run a second time by accident. ``forget_keys=True`` removes the tombstones
too (of the jobs it prunes and of earlier prunes before the cutoff): after that, planning
such an identity creates a new job. Reads of a pruned job (``job``, ``state``,
``effects``, ``history``, ``cancel``, ``retry``) raise :class:`model.errors.JobPruned`,
an ``UnknownJob`` that says when the job finished and was pruned; a call with a lease of a
pruned job raises ``LeaseLost`` (the lease ended when the job finished), as for any lost
lease.

``forget_keys`` is for keys old enough that nobody can still hold a lease of them: a job
planned again after its key was forgotten starts over at token 0, so a worker that held
a lease of the old job (ended long before the cutoff) must be gone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from attrs import frozen

from model.errors import InvalidInput
from model.record import EffectInfo, HistoryEvent, JobInfo

PRUNE_BATCH_DEFAULT = 200
"""Jobs removed per transaction: small enough that a batch holds SQLite's write lock for
well under 50 ms even on a loaded machine (bench/README.md, "Prune"), large enough that
the per-commit cost is shared by many jobs."""


PRUNED_REASON = "the job finished and was pruned"
"""The ``LeaseLost`` reason for a lease of a pruned job (its lease ended when it finished)."""


@frozen
class Tombstone:
    """What a pruned job leaves behind: enough to keep its key planned, and to say so."""

    job_id: str
    kind: str
    state: str
    finished_at: float
    pruned_at: float


@frozen
class PrunedJob:
    """A job as ``prune`` hands it to the archive callback before deleting it: what
    ``show --json`` would have printed (the job, its effects, its history)."""

    job: JobInfo
    effects: tuple[EffectInfo, ...]
    history: tuple[HistoryEvent, ...]


@frozen
class PruneReport:
    """What one ``prune`` call removed (or, with ``dry_run``, would remove).

    ``jobs`` and ``effects`` count the removed rows; ``tombstones`` the keys kept for the
    removed jobs (0 with ``forget_keys``); ``forgotten`` the tombstones of earlier
    prunes removed by ``forget_keys``; ``batches`` the transactions that removed
    something (0 for a dry run).
    """

    jobs: int = 0
    effects: int = 0
    tombstones: int = 0
    forgotten: int = 0
    batches: int = 0

    def plus(
        self, *, jobs: int = 0, effects: int = 0, tombstones: int = 0, forgotten: int = 0
    ) -> PruneReport:
        """Return this report with one more batch's counts added."""
        return PruneReport(
            jobs=self.jobs + jobs,
            effects=self.effects + effects,
            tombstones=self.tombstones + tombstones,
            forgotten=self.forgotten + forgotten,
            batches=self.batches + 1,
        )


ArchiveFn = Callable[[Sequence[PrunedJob]], None]
"""Called with each batch's jobs after they are read and before their delete commits;
it must make them durable (write and fsync) before it returns. If it raises, the batch
is rolled back and ``prune`` stops with that exception."""

ProgressFn = Callable[[PruneReport], None]
"""Called after each committed batch with the running totals."""

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_age(text: str) -> float:
    """Return the seconds an age like ``30d``, ``12h``, ``15m``, ``90s``, ``2w`` or ``0s``
    means (a bare number is seconds).

    Raises:
        InvalidInput: for anything else, saying what is accepted.
    """
    match = _AGE.match(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInput(
            f"age {text!r} is not a number followed by one of s, m, h, d, w (e.g. 30d, "
            "12h, 0s); give how long ago a job must have finished to be pruned"
        )
    return float(match.group(1)) * _UNIT[match.group(2)]


def check_batch_size(value: object) -> int:
    """Return ``value`` if it is an int >= 1, else raise ``InvalidInput``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"batch_size must be an integer >= 1, got {value!r}")
    return value


def check_limit(value: object) -> int | None:
    """Return ``value`` if it is None or an int >= 0, else raise ``InvalidInput``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"limit must be None or an integer >= 0, got {value!r}")
    return value


def check_cutoff(value: object) -> float:
    """Return ``finished_before`` of ``prune`` as a float: a finite time in store seconds.

    Raises:
        InvalidInput: for anything else.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or math.isinf(value)
    ):
        raise InvalidInput(
            f"finished_before must be a finite time in store seconds (e.g. store.now() - "
            f"30 * 86400), got {value!r}"
        )
    return float(value)
