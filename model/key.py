"""Canonical encoding and the two keys derived from it: job keys and op keys.

The encoding is fixed by the contract (section 6) so any language can reproduce it:
JSON with sorted keys, no insignificant white space, UTF-8, no NaN, and a version tag
inside the hashed object. Changing anything here changes every key ever issued, which is
why golden vectors in the tests pin it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping

from model.errors import InvalidIdentity

Scalar = str | int | bool | None
"""A value allowed in an identity or in effect extras."""

KEY_VERSION = 1


# One encoder for every call: json.dumps with options builds a new one each time, which
# was a third of the cost of planning.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
# What _ENCODER.encode does with a str (ensure_ascii=False), without the method around it.
_string = json.encoder.encode_basestring


def canon(value: object) -> bytes:
    """Encode ``value`` as canonical JSON bytes (the contract's ``canon``)."""
    return _ENCODER.encode(value).encode("utf-8")


def _flat_chunks() -> Callable[[object, int], Iterable[str]]:
    # JSONEncoder.encode builds its C encoder anew on every call; for a dict already
    # checked to hold only str keys and str/int/bool/None values (no nesting, hence no
    # cycles to detect, no floats) the same C encoder can be made once.
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return lambda value, _level: (_ENCODER.encode(value),)
    chunks: Callable[[object, int], Iterable[str]] = make(
        None, _ENCODER.default, _string, None, ":", ",", True, False, False
    )
    return chunks


canon_flat_chunks = _flat_chunks()
"""The pieces of ``canon_flat(value)``, for a caller that joins them itself (the call is
``canon_flat_chunks(value, 0)``)."""


def canon_flat(value: object) -> str:
    """``canon(value).decode()`` for a dict of str to str/int/bool/None (checked by the
    caller)."""
    return "".join(canon_flat_chunks(value, 0))


def check_scalars(mapping: object, *, what: str) -> dict[str, Scalar]:
    """Return ``mapping`` as a plain dict after checking it holds only str -> scalar.

    Raises:
        InvalidIdentity: naming the offending key and the type found.
    """
    if not isinstance(mapping, Mapping):
        raise InvalidIdentity(
            f"{what} must be a mapping of str to str/int/bool/None, got "
            f"{type(mapping).__name__}; pass a dict such as {{'url': 'https://...'}}"
        )
    out: dict[str, Scalar] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise InvalidIdentity(f"{what} key {key!r} is a {type(key).__name__}; keys must be str")
        # bool is a subclass of int, so the explicit tuple admits both as themselves.
        if value is not None and not isinstance(value, str | int):
            raise InvalidIdentity(
                f"{what}[{key!r}] is a {type(value).__name__} ({value!r}); values must be "
                "str, int, bool or None (floats and containers are not stable keys: "
                "encode them as strings)"
            )
        out[key] = value
    return out


def not_unicode(what: str, exc: UnicodeEncodeError) -> InvalidIdentity:
    """The error for a key's text that holds a lone surrogate (no UTF-8 encoding exists,
    so no key can be computed and no backend could store it)."""
    found = exc.object[exc.start : exc.end]
    return InvalidIdentity(
        f"{what} holds the lone surrogate {found!r}, which is not Unicode text, so it has "
        "no canonical encoding; decode bytes with errors='replace' or 'backslashreplace'"
    )


def job_key(kind: str, identity: Mapping[str, Scalar]) -> str:
    """Return the job key: SHA-256 hex of ``canon({"v": 1, "kind": kind, "id": identity})``.

    Raises:
        InvalidIdentity: if ``kind`` is not a non-empty str or ``identity`` holds
            anything but str keys and str/int/bool/None values.
    """
    if not isinstance(kind, str) or not kind:
        raise InvalidIdentity(f"kind must be a non-empty str, got {kind!r}")
    ident = check_scalars(identity, what="identity")
    try:
        data = canon({"v": KEY_VERSION, "kind": kind, "id": ident})
    except UnicodeEncodeError as exc:
        raise not_unicode("the kind or identity", exc) from None
    return hashlib.sha256(data).hexdigest()


def op_key(job_id: str, op: str, extras: Mapping[str, Scalar] | None = None) -> str:
    """Return the op key: SHA-256 hex of ``canon({"v": 1, "job": job_id, "op": op, "x": extras})``.

    Raises:
        InvalidIdentity: if ``op`` is not a non-empty str or ``extras`` is not a mapping
            of str to scalars.
    """
    if not isinstance(op, str) or not op:
        raise InvalidIdentity(f"op must be a non-empty str, got {op!r}")
    if not isinstance(job_id, str):
        raise InvalidIdentity(f"job_id must be a str, got {type(job_id).__name__}")
    if extras is None or (type(extras) is dict and not extras):
        # The usual op key, spelled out: canon's sorted keys are job, op, v, x. Pinned to
        # the general encoding by the golden vectors and a property test.
        job, name = _string(job_id), _string(op)
        text = f'{{"job":{job},"op":{name},"v":{KEY_VERSION},"x":{{}}}}'
        try:
            return hashlib.sha256(text.encode("utf-8")).hexdigest()
        except UnicodeEncodeError as exc:
            raise not_unicode("the job id or op", exc) from None
    ext = check_scalars(extras, what="extras")
    try:
        data = canon({"v": KEY_VERSION, "job": job_id, "op": op, "x": ext})
    except UnicodeEncodeError as exc:
        raise not_unicode("the job id, op or extras", exc) from None
    return hashlib.sha256(data).hexdigest()
