"""Argument checks and JSON encodings shared by every store.

These are pure helpers (no decisions about jobs): what counts as a valid payload, effect
result, integer or duration, and the exact text of the errors for each. Every backend
uses them so that the same bad input gets the same typed error and message everywhere.
"""

from __future__ import annotations

import math

from model.errors import EffectResultError, InvalidInput, InvalidPayload
from model.key import canon


def exhausted_message(attempts: int, max_attempts: int) -> str:
    """The ``last_error`` a job gets when it runs out of attempts without a failure."""
    return (
        f"attempts exhausted: {attempts} of {max_attempts} attempts used without success "
        "(the last lease expired); raise max_attempts or `jobledger retry` the job"
    )


INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def non_str_key(value: object) -> object | None:
    """Return the first dict key in ``value`` (at any depth) that is not a str, else None.

    ``json.dumps`` would silently turn ``{1: "a"}`` into ``{"1": "a"}``: what comes back
    would differ from what was given, so such values are refused instead.
    """
    todo: list[object] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    return key  # type: ignore[no-any-return]
                todo.append(inner)
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return None


def encode_payload(payload: object) -> str:
    """Canonical JSON text of a payload, or ``InvalidPayload`` naming what is wrong."""
    bad = non_str_key(payload)
    if bad is not None:
        raise InvalidPayload(
            f"payload keys must be str, found the {type(bad).__name__} key {bad!r}; JSON "
            "objects have string keys, so convert it before planning"
        )
    try:
        return canon(payload).decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(
            f"payload must be JSON (str keys, no NaN or infinity): {exc}; got "
            f"{type(payload).__name__}"
        ) from None


def encode_result(result: object, *, limit: int) -> str:
    """Canonical JSON text of an effect result within ``limit`` bytes.

    Raises:
        EffectResultError: when the result is not JSON or is larger than ``limit``.
    """
    bad = non_str_key(result)
    if bad is not None:
        raise EffectResultError(
            f"effect result keys must be str, found the {type(bad).__name__} key {bad!r}; "
            "a replay would return it as a string, so convert it before returning"
        )
    try:
        text = canon(result).decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise EffectResultError(
            f"effect result must be JSON (str keys, no NaN or infinity): {exc}; got "
            f"{type(result).__name__}; return a JSON-compatible value"
        ) from None
    size = len(text.encode("utf-8"))
    if size > limit:
        raise EffectResultError(
            f"effect result is {size} bytes of JSON, over the limit of {limit}; store large "
            "data elsewhere and return a reference, or raise result_limit"
        )
    return text


def check_int(value: object, *, name: str, minimum: int | None = None) -> int:
    """Return ``value`` if it is an int (not bool) at least ``minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidInput(f"{name} must be >= {minimum}, got {value}")
    if not INT64_MIN <= value <= INT64_MAX:
        # Every backend stores these as 64-bit integers.
        raise InvalidInput(
            f"{name} must fit in a signed 64-bit integer ({INT64_MIN} to {INT64_MAX}), got {value}"
        )
    return value


def check_seconds(value: object, *, name: str, positive: bool = False) -> float:
    """Return ``value`` as seconds if it is a finite number (>= 0, or > 0), else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidInput(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0) or math.isinf(value):
        need = "> 0" if positive else ">= 0"
        raise InvalidInput(f"{name} must be {need} and finite, got {value!r}")
    return float(value)


def check_on_doubt(on_doubt: object) -> None:
    """Refuse an ``on_doubt`` that is not "retry", "raise" or a callable."""
    if on_doubt not in ("retry", "raise") and not callable(on_doubt):
        raise InvalidInput(
            f"on_doubt must be 'retry', 'raise' or a callable probe, got {on_doubt!r}"
        )
