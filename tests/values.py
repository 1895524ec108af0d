"""The values users store, as Hypothesis strategies, and a strict equality for them.

Users hand jobledger six kinds of value: identities and effect extras (flat mappings of
str to str/int/bool/None), payloads and effect results (any JSON), and the texts given to
``fail`` and ``cancel``. The strategies here draw them from where storage code breaks:
astral characters, NUL, the line separators ``str.splitlines`` knows, quotes and
backslashes, long strings, integers at and past 64 bits, floats such as ``-0.0``,
``1e308`` and the smallest subnormal, deep nesting, many keys, and sizes exactly at the
configured limits (one byte under, at, one byte over). A share of the draws is what the
model refuses (lone surrogates, NaN and infinities, too deep, too large, non-str keys),
so a backend that accepts what the model refuses is caught as well.

The round-trip tests (``tests/conformance/test_values.py``) and the stateful agreement
machine (``tests/stateful/machine.py``) both draw from here. :func:`typed` turns a value
into a form whose ``==`` is exact: ``1`` and ``1.0`` and ``True`` differ, ``-0.0`` keeps
its sign, and (where asked) the order of a mapping's keys counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from attrs import frozen
from hypothesis import strategies as st

from model.key import canon


@frozen
class Sizes:
    """How big the big values get (the stateful machine reads every job's values back at
    every step, so it draws them smaller than the round-trip tests do)."""

    long_texts: tuple[int, ...] = (255, 256, 1000, 4096, 70_000)
    many_keys: tuple[int, ...] = (100, 1000, 3000)


FULL = Sizes()
COMPACT = Sizes(long_texts=(255, 256, 1000, 4096), many_keys=(64,))

# -- text ---------------------------------------------------------------------------------

SPECIAL_CHARS = (
    "\x00",  # NUL: PostgreSQL's text refuses it, SQLite's C functions stop at it
    "\n",
    "\r",
    "\t",
    "\x1f",
    "\x7f",
    "\x85",  # NEL, U+2028, U+2029: str.splitlines splits there, JSON does not escape them
    "\u2028",
    "\u2029",
    '"',
    "\\",
    "'",
    "%",  # LIKE and format metacharacters
    "_",
    "é",  # two UTF-8 bytes
    "\u20ac",  # three
    "\ufeff",  # a byte-order mark
    "\uffff",
    "\U0001f600",  # astral: four UTF-8 bytes, a surrogate pair in UTF-16
    "\U0010ffff",
)
LONE_SURROGATES = ("\ud800", "\udbff", "\udc00", "\udc80", "\udfff")

_chars = st.one_of(st.sampled_from(SPECIAL_CHARS), st.characters(codec="utf-8"))


@st.composite
def _long_text(draw: st.DrawFn, sizes: Sizes) -> str:
    """A long string cheaply: a short drawn piece repeated to a few to tens of thousands
    of characters (a backend that cuts strings past some length shows it)."""
    piece = draw(st.text(_chars, min_size=1, max_size=8))
    count = draw(st.sampled_from(sizes.long_texts))
    return (piece * (count // len(piece) + 1))[:count]


def texts(*, max_size: int = 40, sizes: Sizes = FULL) -> st.SearchStrategy[str]:
    """Valid Unicode text (every store must keep it exactly), short or long."""
    return st.one_of(
        st.text(_chars, max_size=max_size),
        st.sampled_from(["", " ", "null", "0", "true", "[]", "{}", '"x"', "1.0"]),
        _long_text(sizes),
    )


@st.composite
def _with_surrogate(draw: st.DrawFn) -> str:
    """Text with one lone surrogate somewhere: not Unicode, refused by the model."""
    text = draw(st.text(_chars, max_size=10))
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.sampled_from(LONE_SURROGATES)) + text[at:]


def error_texts(*, sizes: Sizes = FULL) -> st.SearchStrategy[str]:
    """Texts for ``fail(error)`` and ``cancel(reason)``: mostly storable, some refused
    (a NUL or a lone surrogate: ``InvalidInput``)."""
    return st.one_of(
        texts(sizes=sizes),
        texts(sizes=sizes),
        _with_surrogate(),
        st.text(_chars, max_size=8).map(lambda t: t + "\x00"),
    )


# -- scalars ------------------------------------------------------------------------------

INT_EDGES = (
    0,
    1,
    -1,
    2**31,
    2**53 + 1,  # the first int a double cannot hold
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    -(2**64),
    10**40,
)
FLOAT_EDGES = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.1,
    1e16,  # repr "1e+16": no decimal point, must still come back a float
    1e308,
    -1e308,
    1.7976931348623157e308,
    5e-324,
    2.0**53,
)
BAD_FLOATS = (math.nan, math.inf, -math.inf)


def ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(INT_EDGES), st.integers())


def floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=False, allow_infinity=False))


def scalars(*, sizes: Sizes = FULL) -> st.SearchStrategy[object]:
    """Identity and extras values: str, int, bool or None (all storable)."""
    return st.one_of(st.none(), st.booleans(), ints(), texts(max_size=20, sizes=sizes))


# -- flat mappings: identities and extras ---------------------------------------------------


def identities(*, sizes: Sizes = FULL) -> st.SearchStrategy[dict[str, object]]:
    """Identities and extras: mostly valid, a share refused (a lone surrogate in a key
    or value, a float: ``InvalidIdentity``)."""
    keys = st.text(_chars, max_size=12)
    good = st.one_of(
        st.dictionaries(keys, scalars(sizes=sizes), max_size=6),
        _many_keys(scalars(sizes=sizes), sizes),
    )
    bad_value = st.one_of(_with_surrogate(), st.sampled_from([1.0, -0.0, math.nan]))
    bad = st.builds(
        lambda base, key, value: {**base, key: value},
        st.dictionaries(keys, scalars(sizes=sizes), max_size=3),
        st.one_of(keys, _with_surrogate()),
        st.one_of(scalars(sizes=sizes), bad_value),
    )
    return st.one_of(good, good, good, bad)


@st.composite
def _many_keys(
    draw: st.DrawFn, values: st.SearchStrategy[object], sizes: Sizes
) -> dict[str, object]:
    """A mapping with hundreds to thousands of keys (drawn cheaply: numbered keys)."""
    count = draw(st.sampled_from(sizes.many_keys))
    value = draw(values)
    return {f"k{i:05d}": value for i in range(count)}


# -- JSON: payloads and effect results ---------------------------------------------------


def _json_scalars(*, refused: bool, sizes: Sizes = FULL) -> st.SearchStrategy[object]:
    base = st.one_of(st.none(), st.booleans(), ints(), floats(), texts(sizes=sizes))
    if not refused:
        return base
    return st.one_of(base, base, base, st.sampled_from(BAD_FLOATS), _with_surrogate())


def json_values(*, refused: bool = True, sizes: Sizes = FULL) -> st.SearchStrategy[object]:
    """Nested JSON; with ``refused`` some leaves are NaN, infinities or lone surrogates,
    and some mappings have non-str keys (the model refuses them)."""
    keys: st.SearchStrategy[object] = st.text(_chars, max_size=12)
    if refused:
        keys = st.one_of(keys, keys, keys, st.integers(0, 3))
    return st.recursive(
        _json_scalars(refused=refused, sizes=sizes),
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.dictionaries(keys, inner, max_size=5),  # type: ignore[arg-type]
        ),
        max_leaves=12,
    )


def nest(value: object, depth: int, *, as_list: bool = True) -> object:
    """``value`` wrapped in ``depth`` lists (or single-key mappings)."""
    for i in range(depth):
        value = [value] if as_list else {f"d{i}": value}
    return value


def depth_of(value: object) -> int:
    """How deeply ``value``'s containers nest (0 for a scalar); the model's definition."""
    if isinstance(value, Mapping):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list | tuple):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def size_of(value: object) -> int:
    """The size the result limit counts: bytes of canonical JSON."""
    return len(canon(value))


def pad_to(value: object, size: int) -> object:
    """``{"p": padding, "v": value}`` whose canonical JSON is exactly ``size`` bytes.

    The padding mixes four-byte astral characters with ASCII, so a backend that counts
    characters instead of bytes, or cuts at a byte count, is off by a visible amount.
    ``value`` must be encodable and small enough to leave room for the wrapper.
    """
    room = size - size_of({"p": "", "v": value})
    if room < 0:
        raise ValueError(f"cannot pad {value!r} to {size} bytes")
    astral, ascii_ = divmod(room, 4)
    return {"p": "\U0001f600" * astral + "x" * ascii_, "v": value}


@st.composite
def _at_size_limit(draw: st.DrawFn, limit: int) -> object:
    inner = draw(st.one_of(st.none(), ints(), floats(), st.text(_chars, max_size=4)))
    size = draw(st.sampled_from([limit - 1, limit, limit + 1]))
    if size < size_of({"p": "", "v": inner}):
        inner = None
    return pad_to(inner, max(size, size_of({"p": "", "v": None})))


@st.composite
def _at_depth_limit(draw: st.DrawFn, depth_limit: int) -> object:
    depth = draw(st.sampled_from([depth_limit - 1, depth_limit, depth_limit + 1]))
    leaf = draw(_json_scalars(refused=False))
    return nest(leaf, max(depth, 0), as_list=draw(st.booleans()))


def payloads(*, depth_limit: int, sizes: Sizes = FULL) -> st.SearchStrategy[object]:
    """Payloads: nested JSON, many keys, long strings, nesting at the depth limit."""
    return st.one_of(
        json_values(sizes=sizes),
        json_values(refused=False, sizes=sizes),
        _many_keys(_json_scalars(refused=False, sizes=sizes), sizes),
        _at_depth_limit(depth_limit),
        _at_depth_limit(depth_limit),  # twice: the edge is where off-by-ones hide
    )


def results(*, limit: int, depth_limit: int, sizes: Sizes = FULL) -> st.SearchStrategy[object]:
    """Effect results: as payloads, plus sizes one byte under, at and over ``limit``."""
    return st.one_of(payloads(depth_limit=depth_limit, sizes=sizes), _at_size_limit(limit))


# -- exact comparison -----------------------------------------------------------------------


def typed(value: object, *, ordered: bool = True) -> object:
    """``value`` in a form whose ``==`` is exact.

    Each scalar is tagged with its type (so ``1``, ``1.0`` and ``True`` differ) and floats
    compare by ``repr`` (so ``-0.0`` differs from ``0.0``). Mappings become lists of
    pairs: in their order when ``ordered``, else sorted by key (for identities and extras,
    whose key order carries no meaning: their key is canonical).
    """
    if isinstance(value, Mapping):
        items = [(str(type(k).__name__), k, typed(v, ordered=ordered)) for k, v in value.items()]
        if not ordered:
            items.sort(key=lambda item: (item[0], repr(item[1])))
        return ("map", items)
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v, ordered=ordered) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)
