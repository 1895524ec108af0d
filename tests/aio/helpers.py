"""Shared pieces of the impl.aio tests: a workflow, and running a coroutine on a fresh
event loop in debug mode that fails the test if any callback blocked it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from model import Workflow
from tests.loopwatch import LoopWatch

T = TypeVar("T")

FLOW = Workflow("flow", ["A", "B", "C"], [("A", "B"), ("B", "C")], initial="A", terminal=["C"])


def run_checked(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` in debug mode; fail if the loop was ever blocked."""
    watch = LoopWatch()
    try:
        with asyncio.Runner(debug=True) as runner:
            watch.attach(runner.get_loop())
            result = runner.run(coro)
    finally:
        blocked = watch.close()
    assert not blocked, f"the event loop was blocked: {blocked}"
    return result
