"""Job keys and op keys: the contract's exact formula, pinned by golden vectors.

Keys are the identity of work across processes, machines and releases: a change of the
encoding would silently plan every job again. The expected values are computed here from
the formula of CONTRACT section 6 with nothing but hashlib and json, and a few literal
digests pin the formula itself against a refactor of both sides.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import impl
from model import Store

from .flows import setup


def canon(value: object) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def by_hand_job_key(kind: str, identity: dict[str, object]) -> str:
    return hashlib.sha256(canon({"v": 1, "kind": kind, "id": identity})).hexdigest()


def by_hand_op_key(job_id: str, op: str, extras: dict[str, object] | None) -> str:
    return hashlib.sha256(canon({"v": 1, "job": job_id, "op": op, "x": extras or {}})).hexdigest()


DOWNLOAD_IDENTITY = {
    "work_id": "w1",
    "artifact_id": "a1",
    "canonical_url": "https://example.org/a.pdf",
}

GOLDEN_JOB_KEYS = [
    (
        "download",
        DOWNLOAD_IDENTITY,
        "7f3e47db3767935c483c65766b0331277d450c8c15171108224c1cc8ee45f491",
    ),
    ("linear", {}, "7a40c06e2609bbba0c8bde17f3d41fe028d5f28d6a0adf8c2a7739275c217540"),
    ("linear", {"n": 1}, "5d2ba126fc97e9815e59c91444e32e1939b2a3fb279e925823131c14f2020374"),
    ("linear", {"n": True}, "88d45c0095413c95db54b9216638a8f50c7a5999fe862c2c0d9ee5b9bc8c866c"),
    (
        "linear",
        {"title": "café ☕", "x": None},
        "e986d90e670f08edce943815751cec435f3b1f464eaf23649c1ab5920ba9e5ef",
    ),
]

ZERO_JOB = "0" * 64
GOLDEN_OP_KEYS = [
    (ZERO_JOB, "HEAD", None, "03a89e88ca518060a85c21a3a186fab00557c630fbf62b4b6b8d14ade94a569f"),
    (
        ZERO_JOB,
        "STREAM",
        {"part": 1},
        "dc6a5b4b50c61fee11851f0f6e30bdae85eed1c759b21351c777e19fcedb4e57",
    ),
    (
        ZERO_JOB,
        "STREAM",
        {"part": True},
        "15025444f8c58ebc7f6e9ccab2a990c2bea14586c34668cff621352a853a3faf",
    ),
]


@pytest.mark.parametrize(("kind", "identity", "digest"), GOLDEN_JOB_KEYS)
def test_job_key_golden_vectors(
    store: Store, kind: str, identity: dict[str, object], digest: str
) -> None:
    setup(store)
    assert by_hand_job_key(kind, identity) == digest
    assert impl.job_key(kind, identity) == digest  # type: ignore[arg-type]
    assert store.plan(kind, identity) == digest  # type: ignore[arg-type]
    assert store.job(digest).identity == identity


def test_canonical_encoding_is_sorted_compact_utf8() -> None:
    """The bytes hashed for a job key, spelled out once so nobody has to guess."""
    assert canon({"v": 1, "kind": "linear", "id": {"x": None, "title": "café ☕"}}) == (
        b'{"id":{"title":"caf\xc3\xa9 \xe2\x98\x95","x":null},"kind":"linear","v":1}'
    )


@pytest.mark.parametrize(("job_id", "op", "extras", "digest"), GOLDEN_OP_KEYS)
def test_op_key_golden_vectors(
    job_id: str, op: str, extras: dict[str, object] | None, digest: str
) -> None:
    assert by_hand_op_key(job_id, op, extras) == digest
    assert impl.op_key(job_id, op, extras) == digest  # type: ignore[arg-type]


def test_op_key_reaches_the_effect_unchanged(store: Store) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    lease = store.lease_next("w1")
    assert lease is not None
    seen: list[str] = []
    store.run_effect(lease, "STREAM", lambda ctx: seen.append(ctx.op_key), extras={"part": 1})
    assert seen == [by_hand_op_key(job_id, "STREAM", {"part": 1})]
    assert [e.op_key for e in store.effects(job_id)] == seen


def test_key_order_of_identity_does_not_matter(store: Store) -> None:
    setup(store)
    first = store.plan("linear", {"a": 1, "b": "x"})
    second = store.plan("linear", {"b": "x", "a": 1})
    assert first == second == by_hand_job_key("linear", {"a": 1, "b": "x"})
    assert len(store.jobs()) == 1


def test_true_and_one_are_different_identities(store: Store) -> None:
    setup(store)
    as_bool = store.plan("linear", {"n": True})
    as_int = store.plan("linear", {"n": 1})
    assert as_bool != as_int
    assert [j.job_id for j in store.jobs()] == [as_bool, as_int]
    assert store.job(as_bool).identity == {"n": True}
    assert store.job(as_bool).identity["n"] is True
    assert store.job(as_int).identity["n"] is not True


def test_kind_is_part_of_the_key(store: Store) -> None:
    setup(store)
    assert impl.job_key("linear", {"n": 1}) != impl.job_key("download", {"n": 1})


def test_extras_none_and_empty_are_the_same_op() -> None:
    assert impl.op_key(ZERO_JOB, "HEAD") == impl.op_key(ZERO_JOB, "HEAD", {})
    assert impl.op_key(ZERO_JOB, "HEAD", {"n": 1}) != impl.op_key(ZERO_JOB, "HEAD", {"n": True})


BAD_IDENTITIES = [
    pytest.param({"n": 1.5}, id="float"),
    pytest.param({"n": 1.0}, id="integral-float"),
    pytest.param({"n": math.nan}, id="nan"),
    pytest.param({"n": math.inf}, id="inf"),
    pytest.param({"n": {"m": 1}}, id="nested-dict"),
    pytest.param({"n": [1, 2]}, id="list"),
    pytest.param({"n": (1, 2)}, id="tuple"),
    pytest.param({1: "a"}, id="int-key"),
    pytest.param({("a",): "a"}, id="tuple-key"),
    pytest.param({"n": b"bytes"}, id="bytes"),
    pytest.param(["n", 1], id="not-a-mapping"),
]


@pytest.mark.parametrize("identity", BAD_IDENTITIES)
def test_bad_identity_is_rejected_and_plans_nothing(store: Store, identity: object) -> None:
    setup(store)
    with pytest.raises(impl.InvalidIdentity) as info:
        store.plan("linear", identity)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, impl.JobledgerError)
    assert str(info.value)
    assert store.jobs() == []
    with pytest.raises(impl.InvalidIdentity):
        impl.job_key("linear", identity)  # type: ignore[arg-type]


@pytest.mark.parametrize("extras", BAD_IDENTITIES)
def test_bad_extras_are_rejected(store: Store, extras: object) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    lease = store.lease_next("w1")
    assert lease is not None
    calls: list[object] = []
    with pytest.raises(impl.InvalidIdentity):
        store.run_effect(lease, "op", calls.append, extras=extras)  # type: ignore[arg-type]
    assert calls == []
    assert store.effects(job_id) == []
    with pytest.raises(impl.InvalidIdentity):
        impl.op_key(job_id, "op", extras)  # type: ignore[arg-type]


@given(job_id=st.text(), op=st.text(min_size=1), empty=st.sampled_from([None, {}]))
def test_op_key_without_extras_is_the_formula_for_any_text(
    job_id: str, op: str, empty: dict[str, object] | None
) -> None:
    """The op key of an effect without extras is built without the general encoder;
    it must still be the contract's formula, whatever the text (quotes, escapes,
    control characters, non-ASCII; lone surrogates fail alike)."""
    try:
        expected = by_hand_op_key(job_id, op, None)
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            impl.op_key(job_id, op, empty)
        return
    assert impl.op_key(job_id, op, empty) == expected


@pytest.mark.parametrize("extras", [[], "", 0, ()])
def test_op_key_refuses_falsy_extras_that_are_not_mappings(extras: object) -> None:
    with pytest.raises(impl.InvalidIdentity, match="extras"):
        impl.op_key(ZERO_JOB, "HEAD", extras)  # type: ignore[arg-type]
