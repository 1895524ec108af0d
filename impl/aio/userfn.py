"""Checking what the user's effect function handed back to the async face."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable

from model.errors import InvalidInput
from model.record import JSON


async def awaited_result(result: Awaitable[JSON] | JSON, what: str) -> JSON:
    """Await ``result`` of an async ``fn``; refuse a sync function's plain value.

    Raises:
        InvalidInput: ``result`` is not awaitable (a sync ``fn`` was given).
    """
    if not inspect.isawaitable(result):
        raise InvalidInput(
            f"the async store's run_effect needs an async {what} (async def fn(ctx)), "
            f"but it returned {type(result).__name__} instead of an awaitable; "
            "use the sync store for a sync function"
        )
    done: JSON = await result
    return done
