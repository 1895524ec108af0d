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


def _shape(value: object, *, depth_limit: int) -> tuple[str, object] | None:
    """The first reason ``value`` cannot round-trip as JSON that ``json.dumps`` would not
    catch itself: ("key", the non-str key) or ("depth", the depth reached past the limit).

    One walk, level by level (no recursion, so no depth can overflow the stack here; a
    value that contains itself ends at the depth limit).
    """
    depth = 0
    level: list[object] = [value]
    while level:
        inner: list[object] = []
        containers = False
        for item in level:
            if isinstance(item, dict):
                containers = True
                for key, child in item.items():
                    if not isinstance(key, str):
                        return ("key", key)
                    inner.append(child)
            elif isinstance(item, list | tuple):
                containers = True
                inner.extend(item)
        if not containers:
            return None
        depth += 1
        if depth > depth_limit:
            return ("depth", depth)
        level = inner
    return None


def check_text(value: object, *, name: str) -> str:
    """Return ``value`` if it is text every backend stores and returns unchanged.

    Error texts and cancel reasons are stored as plain text columns: PostgreSQL's text
    cannot hold NUL (and SQLite's own functions and shell stop at it), and a lone
    surrogate is not Unicode, so no backend can encode it as UTF-8. Both are refused the
    same way everywhere; :func:`storable_text` makes any str acceptable.

    Raises:
        InvalidInput: not a str, or holding a NUL or a lone surrogate.
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a str, got {type(value).__name__}")
    where = value.find("\x00")
    if where >= 0:
        raise InvalidInput(
            f"{name} holds a NUL character (at index {where}), which a text column cannot "
            "store; remove or escape it (model.validate.storable_text does)"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(
                f"{name} holds the lone surrogate {value[exc.start]!r} (at index {exc.start}), "
                "which is not Unicode text and cannot be stored; decode bytes with "
                "errors='replace' or 'backslashreplace' (storable_text does)"
            ) from None
    return value


def storable_text(text: str) -> str:
    """Return ``text`` with what :func:`check_text` refuses escaped: a NUL becomes
    ``\\x00`` and a lone surrogate its ``\\udcXX`` escape (for messages jobledger
    composes itself, such as the error text of an exception a handler raised)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _not_json(what: str, problem: tuple[str, object], depth_limit: int) -> str:
    """The message for a value refused by :func:`_shape`."""
    kind, found = problem
    if kind == "key":
        return (
            f"{what} keys must be str, found the {type(found).__name__} key {found!r}; JSON "
            "objects have string keys, so convert it first (a replay would return it as a "
            "string)"
        )
    return (
        f"{what} nests containers more than {depth_limit} deep (json_depth_limit); every "
        "backend must be able to decode it again, so flatten it or raise json_depth_limit"
    )


def encode_payload(payload: object, *, depth_limit: int) -> str:
    """Canonical JSON text of a payload, or ``InvalidPayload`` naming what is wrong.

    Args:
        payload: the value to encode.
        depth_limit: the deepest nesting of containers accepted (``json_depth_limit``).
    """
    problem = _shape(payload, depth_limit=depth_limit)
    if problem is not None:
        raise InvalidPayload(_not_json("payload", problem, depth_limit))
    try:
        return canon(payload).decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(
            f"payload must be JSON (str keys, no NaN or infinity, valid Unicode): {exc}; got "
            f"{type(payload).__name__}"
        ) from None


def encode_result(result: object, *, limit: int, depth_limit: int) -> str:
    """Canonical JSON text of an effect result within ``limit`` bytes.

    Args:
        result: the value ``fn`` (or a probe) returned.
        limit: the largest encoded size accepted, in bytes (``result_limit``).
        depth_limit: the deepest nesting of containers accepted (``json_depth_limit``).

    Raises:
        EffectResultError: when the result is not JSON, nests too deeply or is larger
            than ``limit``.
    """
    problem = _shape(result, depth_limit=depth_limit)
    if problem is not None:
        raise EffectResultError(_not_json("effect result", problem, depth_limit))
    try:
        data = canon(result)
    except (TypeError, ValueError) as exc:
        raise EffectResultError(
            f"effect result must be JSON (str keys, no NaN or infinity, valid Unicode): {exc}; "
            f"got {type(result).__name__}; return a JSON-compatible value"
        ) from None
    size = len(data)
    if size > limit:
        raise EffectResultError(
            f"effect result is {size} bytes of JSON, over the limit of {limit}; store large "
            "data elsewhere and return a reference, or raise result_limit"
        )
    return data.decode("utf-8")


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
