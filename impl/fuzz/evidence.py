"""Evidence: everything a fuzz run left behind, read back for the checker.

A run leaves a database, one history log per worker process and the fenced sink. This
module reads them into one :class:`~impl.fuzz.checker.Evidence`, whether the run was the
multi-process fuzz or an in-process test that built a history by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from impl.fuzz.checker import Evidence
from impl.fuzz.history import Entry, HistoryDamaged, read_histories
from impl.fuzz.sink import FencedSink, integrity_of
from impl.fuzz.workload import KIND, WORKFLOW
from model.record import EffectInfo, HistoryEvent, JobInfo
from model.retention import PrunedJob
from model.store import Store


def collect_evidence(
    store: Store,
    *,
    planned: Iterable[str],
    logs: Path,
    sink: Path,
    db: Path | None = None,
    integrity: Mapping[str, str] | None = None,
    drain_started_at: float | None = None,
    step: float = 1.0,
    liveness_steps: int = 1000,
    worker_errors: Iterable[str] = (),
    archived: Iterable[PrunedJob] = (),
) -> tuple[Evidence, int]:
    """Read what a run left behind into :class:`Evidence`; also return the torn lines.

    Args:
        store: a store on the run's database.
        planned: every job id the run planned.
        logs: the folder of history logs.
        sink: the fenced sink's file.
        db: a SQLite ledger file, checked with ``integrity_check`` when given.
        integrity: further verdicts by name ("ok" when intact), computed by the caller
            (a PostgreSQL ledger has none: it is read through the Store API only).
        archived: jobs a prune removed, as its archive received them: read as if they
            were still in the ledger (a job both archived and in the ledger is a
            violation the checker reports as a job seen twice).
    """
    jobs: dict[str, JobInfo] = {}
    history: dict[str, list[HistoryEvent]] = {}
    effects: dict[str, list[EffectInfo]] = {}
    for info in store.jobs(kind=KIND):
        jobs[info.job_id] = info
        history[info.job_id] = store.history(info.job_id)
        effects[info.job_id] = store.effects(info.job_id)
    twice: list[str] = []
    for pruned in archived:
        job_id = pruned.job.job_id
        if job_id in jobs:
            twice.append(f"job {job_id} was archived by a prune and is still in the ledger")
        jobs[job_id] = pruned.job
        history[job_id] = list(pruned.history)
        effects[job_id] = list(pruned.effects)
    entries: list[Entry] = []
    torn = 0
    errors = list(worker_errors) + twice
    try:
        for log in read_histories(logs):
            entries += log.entries
            torn += log.torn
    except HistoryDamaged as exc:
        errors.append(str(exc))
    fenced = FencedSink(sink)
    try:
        executions = fenced.executions()
    finally:
        fenced.close()
    verdicts = {"sink": integrity_of(sink), **(integrity or {})}
    if db is not None:
        verdicts["ledger"] = integrity_of(db)
    evidence = Evidence(
        workflow=WORKFLOW,
        planned=frozenset(planned),
        jobs=jobs,
        history=history,
        effects=effects,
        entries=entries,
        executions=executions,
        drain_started_at=drain_started_at,
        step=step,
        liveness_steps=liveness_steps,
        integrity=verdicts,
        worker_errors=errors,
    )
    return evidence, torn
