"""Shared pieces of the impl.aio tests: a workflow, and running a coroutine on a fresh
event loop in debug mode that fails the test if any callback blocked it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from model import Workflow
from tests.aiosync import SlowCallbacks, debug_loop

T = TypeVar("T")

FLOW = Workflow("flow", ["A", "B", "C"], [("A", "B"), ("B", "C")], initial="A", terminal=["C"])


def run_checked(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` in debug mode; fail if the loop was ever blocked."""
    slow = SlowCallbacks()
    logging.getLogger("asyncio").addHandler(slow)
    try:
        with asyncio.Runner(debug=True) as runner:
            debug_loop(runner.get_loop())
            result = runner.run(coro)
    finally:
        logging.getLogger("asyncio").removeHandler(slow)
    assert not slow.reports, f"the event loop was blocked: {slow.reports}"
    return result
