"""Reconciling the output directory with the ledger.

* A partial file whose job is finished (``INDEXED``, ``DEDUPED``, ``SKIPPED_DUPLICATE``)
  or unknown to the ledger is removed: nothing will ever resume it. Partial files of
  ``FAILED`` jobs are kept, so an operator ``retry`` resumes instead of starting over.
* A finished job whose object is missing, or holds bytes with another hash, is reported;
  :func:`plan_repairs` plans a *repair job* for it, which fetches the artifact again
  and must produce the recorded SHA-256. A repair job's identity is the original one
  plus ``"repair": n`` (1, 2, ... one more each time a repair's own file goes missing),
  and its payload names the job it repairs, so the original stays as it was recorded.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen

from impl.download.cas import Layout
from model.errors import UnknownJob
from model.key import Scalar
from model.record import JSON, Plan
from model.store import Store

KIND = "download"
FINISHED = frozenset({"INDEXED", "DEDUPED", "SKIPPED_DUPLICATE"})
WITH_OBJECT = frozenset({"INDEXED", "DEDUPED"})
REPAIR_KEY = "repair"
REPAIR_LIMIT = 100


@frozen
class DiskReport:
    """What :func:`reconcile_disk` found and did."""

    parts_removed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    checked: int = 0


def finalize_result(store: Store, job_id: str) -> dict[str, JSON] | None:
    """Return the latest recorded ``FINALIZE`` result of a job, or None."""
    found: dict[str, JSON] | None = None
    for effect in store.effects(job_id):
        if effect.op == "FINALIZE" and effect.status == "done" and isinstance(effect.result, dict):
            found = effect.result
    return found


def reconcile_disk(
    store: Store,
    out_dir: str,
    *,
    job_ids: Iterable[str] | None = None,
    verify_hashes: bool = True,
    dry_run: bool = False,
) -> DiskReport:
    """Remove dead partial files and report finished jobs whose bytes are gone.

    Args:
        job_ids: the finished jobs to check (default: every ``download`` job).
        verify_hashes: re-hash each object (slower, catches silent corruption); else
            only existence and size are checked.
        dry_run: report without removing anything.
    """
    layout = Layout(out_dir)
    removed: list[str] = []
    for job_id, path in sorted(layout.part_jobs().items()):
        try:
            state: str | None = store.state(job_id)
        except UnknownJob:
            state = None
        if state is None or state in FINISHED:
            if not dry_run:
                path.unlink(missing_ok=True)
            removed.append(job_id)
    ids = list(job_ids) if job_ids is not None else [j.job_id for j in store.jobs(kind=KIND)]
    missing: list[str] = []
    checked = 0
    for job_id in ids:
        if store.state(job_id) not in WITH_OBJECT:
            continue
        result = finalize_result(store, job_id)
        if result is None:
            continue
        checked += 1
        sha, size = str(result["sha256"]), int(str(result["size"]))
        ok = (
            layout.object_ok(sha, size)
            if verify_hashes
            else layout.object_path(sha).is_file()
            and layout.object_path(sha).stat().st_size == size
        )
        if not ok:
            missing.append(job_id)
    return DiskReport(parts_removed=tuple(removed), missing=tuple(missing), checked=checked)


def plan_repairs(store: Store, out_dir: str, job_ids: Iterable[str]) -> list[str]:
    """Plan (idempotently) one repair job per finished job whose object is missing.

    Returns the repair jobs' ids that are not finished with their object in place; a
    repair that already restored the bytes is not planned again.
    """
    layout = Layout(out_dir)
    planned: list[str] = []
    for job_id in job_ids:
        info = store.job(job_id)
        result = finalize_result(store, job_id)
        if result is None:
            continue
        sha = str(result["sha256"])
        base = info.payload if isinstance(info.payload, dict) else {}
        payload: dict[str, JSON] = {
            "sha256": sha,
            "extras": base.get("extras", {}),
            "repair_of": job_id,
        }
        for n in range(1, REPAIR_LIMIT + 1):
            identity: dict[str, Scalar] = {**info.identity, REPAIR_KEY: n}
            repair_id = store.plan_many(
                KIND, [Plan(identity, payload=payload, priority=info.priority)]
            )[0]
            state = store.state(repair_id)
            if state not in WITH_OBJECT:
                planned.append(repair_id)
                break
            if layout.object_ok(sha):
                break
    return planned
