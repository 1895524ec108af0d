"""Named failpoints: places where tests make the process crash on purpose.

A failpoint costs one truthiness check of a module-level dict when nothing is armed.
Arm them with :func:`arm` (in-process tests) or the ``JOBLEDGER_FAILPOINTS`` environment
variable (subprocess tests), as ``name=action`` pairs separated by ``;``::

    JOBLEDGER_FAILPOINTS="advance.before_commit=crash;effect.after_start=3*kill"

Actions: ``crash`` raises :class:`Crash` (a ``BaseException``, so no ``except Exception``
in ``impl`` can swallow it); ``kill`` sends SIGKILL to this process; ``N*action`` fires
on the N-th hit only. Names are ``<operation>.<point>`` with points ``before_tx``,
``before_commit`` and ``after_commit`` for every writing operation, and for effects
``effect.after_start``, ``effect.before_record`` and ``effect.after_record``. Each batch
of ``prune`` is a transaction with the three points of operation ``prune`` (hit once per
batch), and ``prune.after_archive`` between the archive's write and the batch's delete.
A SQLite store that groups commits (``sqlite_group_window`` > 0) also hits
``group.before_commit`` and ``group.after_commit`` around the COMMIT of each group
transaction (once per group, in the thread that commits it), and ``group.in_savepoint``
in a member that joined an open group, after its body, inside its savepoint (a crash
there rolls back that member's writes only). An ungrouped SQLite transaction that took
the writers' queue (``impl.sqlite.writers``) hits ``writers.after_acquire`` while holding
it, before ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import os
import signal

from attrs import define

ENV_VAR = "JOBLEDGER_FAILPOINTS"

POINTS = ("before_tx", "before_commit", "after_commit")
OPERATIONS = (
    "register",
    "plan",
    "plan_many",
    "lease_next",
    "renew",
    "release",
    "advance",
    "fail",
    "cancel",
    "retry",
    "reconcile",
    "prune",
    "effect_start",
    "effect_record",
    "effect_abort",
)
EFFECT_POINTS = ("effect.after_start", "effect.before_record", "effect.after_record")
PRUNE_POINTS = ("prune.after_archive",)
ALL = tuple(f"{op}.{p}" for op in OPERATIONS for p in POINTS) + EFFECT_POINTS + PRUNE_POINTS
"""Every failpoint name that every backend hits."""
GROUP_POINTS = ("group.before_commit", "group.after_commit", "group.in_savepoint")
"""The failpoints of SQLite's group commit (``impl.sqlite.group``), hit only by a store
configured to group (``sqlite_group_window`` > 0)."""
LEDGER_THREAD_POINTS = ("ledger_thread.before_call", "ledger_thread.after_call")
"""The failpoints of a worker's ledger thread (``impl.ledgerthread``), around each call it
makes for a handler thread."""
WRITERS_POINTS = ("writers.after_acquire",)
"""The failpoints of SQLite's writers' queue (``impl.sqlite.writers``), hit by an
ungrouped transaction that holds the queue, before it begins."""
NAMES = ALL + GROUP_POINTS + LEDGER_THREAD_POINTS + WRITERS_POINTS
"""Every failpoint name that ``impl`` hits."""


class Crash(BaseException):
    """A simulated crash raised at an armed failpoint."""

    def __init__(self, name: str) -> None:
        super().__init__(f"simulated crash at failpoint {name!r}")
        self.name = name


@define
class _Arm:
    action: str
    countdown: int


ARMED: dict[str, _Arm] = {}
"""The armed failpoints: empty (falsy) in production, so the hottest paths test it
before calling :func:`hit` at all."""


def hit(name: str) -> None:
    """Fire the failpoint ``name`` if it is armed; otherwise do nothing."""
    if ARMED:
        _fire(name)


def _fire(name: str) -> None:
    arm_ = ARMED.get(name)
    if arm_ is None:
        return
    arm_.countdown -= 1
    if arm_.countdown > 0:
        return
    del ARMED[name]
    if arm_.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise Crash(name)


def arm(name: str, action: str = "crash", *, on_hit: int = 1) -> None:
    """Arm failpoint ``name`` to perform ``action`` ("crash" or "kill") on hit ``on_hit``."""
    if name not in NAMES:
        raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(NAMES)}")
    if action not in ("crash", "kill"):
        raise ValueError(f"failpoint action must be 'crash' or 'kill', got {action!r}")
    ARMED[name] = _Arm(action, on_hit)


def disarm_all() -> None:
    """Disarm every failpoint."""
    ARMED.clear()


def armed() -> dict[str, str]:
    """Return the armed failpoints and their actions."""
    return {name: a.action for name, a in ARMED.items()}


def arm_from_env(value: str | None = None) -> None:
    """Arm the failpoints listed in ``JOBLEDGER_FAILPOINTS`` (or ``value``)."""
    spec = os.environ.get(ENV_VAR, "") if value is None else value
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, action = part.partition("=")
        if not sep:
            raise ValueError(f"{ENV_VAR}: {part!r} is not name=action")
        count, star, act = action.partition("*")
        if star:
            arm(name.strip(), act.strip(), on_hit=int(count))
        else:
            arm(name.strip(), action.strip())


arm_from_env()
