"""Multi-process crash fuzzing with a Jepsen-style history check.

Real worker processes run a multi-step workflow against one database while a parent
process owns a simulated clock, SIGKILLs workers at random times and through failpoints,
respawns them, and finally drains every job. Each worker appends what it did and saw to
its own history log; effects write into a fenced sink; a checker then verifies the
histories, the sink and the database against the contract's invariants.

Modules: :mod:`~impl.fuzz.clock` (the shared clock), :mod:`~impl.fuzz.history` (history
logs), :mod:`~impl.fuzz.sink` (the fenced sink), :mod:`~impl.fuzz.workload` (the workflow
and its handler), :mod:`~impl.fuzz.child` (the worker process), :mod:`~impl.fuzz.checker`
(the history check), :mod:`~impl.fuzz.ledger` (where the ledger lives: a SQLite file, or
a fresh PostgreSQL schema with server-side disconnects, :mod:`~impl.fuzz.postgres`) and
:mod:`~impl.fuzz.engine` (the parent that runs it all).
"""

from __future__ import annotations
