"""A deliberately broken fuzz worker, to prove the checker catches real bugs.

``python -m tests.fuzz.broken_child SPEC_JSON`` runs the normal fuzz worker
(:mod:`impl.fuzz.child`) with one bug planted, chosen by the ``FUZZ_BROKEN`` variable:

- ``no-store-fencing``: the SQLite store's lease check only looks the job up; stale and
  expired tokens pass (the store's fencing check removed).
- ``stale-token``: the effect wrapper hands the sink ``ctx.token - 1`` instead of its
  lease's token.
- ``ignore-lease-lost``: the effect wrapper catches ``LeaseLost`` and runs the effect
  anyway, outside ``run_effect``.
- ``unfenced-sink``: the sink accepts every token.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Callable, Mapping

import attrs

from impl.fuzz import child, sink, workload
from impl.fuzz.workload import Tools
from impl.sqlite import effect as sqlite_effect
from impl.sqlite import store as sqlite_store
from impl.sqlite.row import JobRow, require_job
from impl.worker import JobContext
from model.errors import LeaseLost
from model.key import Scalar, op_key
from model.record import JSON, EffectContext, Lease

MODES = ("no-store-fencing", "stale-token", "ignore-lease-lost", "unfenced-sink")


def _unfenced_check(conn: sqlite3.Connection, lease: Lease, now: float, op: str) -> JobRow:
    return require_job(conn, lease.job_id)


def _stale_token_effect(tools: Tools, job_id: str, op: str) -> Callable[[EffectContext], JSON]:
    fn = _sink_effect(tools, job_id, op)

    def stale(ectx: EffectContext) -> JSON:
        return fn(attrs.evolve(ectx, token=ectx.token - 1))

    return stale


def _ignore_lease_lost(
    ctx: JobContext, tools: Tools, op: str, extras: Mapping[str, Scalar] | None
) -> JSON:
    try:
        return _run_step_effect(ctx, tools, op, extras)
    except LeaseLost:
        lease = ctx.lease
        key = op_key(lease.job_id, op, extras)
        fn = workload.sink_effect(tools, lease.job_id, op)
        return fn(EffectContext(lease.job_id, op, key, lease.token, lease.attempt))


_sink_effect = workload.sink_effect
_run_step_effect = workload.run_step_effect


def plant(mode: str) -> None:
    """Plant the bug ``mode`` in this process."""
    if mode == "no-store-fencing":
        sqlite_store.check_lease = _unfenced_check  # type: ignore[assignment]
        sqlite_effect.check_lease = _unfenced_check  # type: ignore[assignment]
    elif mode == "stale-token":
        workload.sink_effect = _stale_token_effect  # type: ignore[assignment]
    elif mode == "ignore-lease-lost":
        workload.run_step_effect = _ignore_lease_lost  # type: ignore[assignment]
    elif mode == "unfenced-sink":
        original = sink.FencedSink.__init__

        def unfenced(self: sink.FencedSink, path: object, *, fenced: bool = True) -> None:
            original(self, path, fenced=False)  # type: ignore[arg-type]

        sink.FencedSink.__init__ = unfenced  # type: ignore[method-assign]
    else:
        raise SystemExit(f"FUZZ_BROKEN must be one of {', '.join(MODES)}, got {mode!r}")


if __name__ == "__main__":
    plant(os.environ.get("FUZZ_BROKEN", ""))
    sys.exit(child.main())
