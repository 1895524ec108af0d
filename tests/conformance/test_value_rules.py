"""What the model refuses of a stored value, and the fixes found by the round trip.

The round-trip property (``test_values.py``) compares each backend with the model on
drawn values; these tests pin the decisions themselves, one by one, with the messages a
user reads, so a change of decision shows up as a named failure rather than a
disagreement found by chance.
"""

from __future__ import annotations

import pytest

import impl
from impl.config import load_config
from model import (
    Config,
    ConfigError,
    EffectResultError,
    EffectStatus,
    Event,
    InvalidIdentity,
    InvalidInput,
    InvalidPayload,
    ManualClock,
    MemoryStore,
    Plan,
    Store,
)
from model.validate import check_text, storable_text
from tests.values import nest

from .flows import StoreFactory, plan_and_lease, setup, snapshot

UNSTORABLE_TEXTS = [
    pytest.param("disk \x00 full", "NUL", id="nul"),
    pytest.param("caf\udce9", "lone surrogate", id="lone-surrogate"),
    pytest.param("\ud83d", "lone surrogate", id="half-a-pair"),
]


@pytest.mark.parametrize(("text", "named"), UNSTORABLE_TEXTS)
def test_fail_refuses_an_unstorable_error_text_and_changes_nothing(
    store: Store, text: str, named: str
) -> None:
    """PostgreSQL's text cannot hold NUL and no backend can encode a lone surrogate, so
    the model refuses both, before the lease is even looked at."""
    setup(store)
    lease = plan_and_lease(store)
    before = snapshot(store, lease.job_id)
    with pytest.raises(InvalidInput, match=named):
        store.fail(lease, text, retryable=False)
    assert snapshot(store, lease.job_id) == before


@pytest.mark.parametrize(("text", "named"), UNSTORABLE_TEXTS)
def test_cancel_refuses_an_unstorable_reason_and_changes_nothing(
    store: Store, text: str, named: str
) -> None:
    setup(store)
    lease = plan_and_lease(store)
    before = snapshot(store, lease.job_id)
    with pytest.raises(InvalidInput, match=named):
        store.cancel(lease.job_id, text)
    assert snapshot(store, lease.job_id) == before


@pytest.mark.parametrize("text", ["a\u2028b", "a\u2029b", "a\x85b", "a\x1cb\x1db\x1eb\x0bb\x0cb"])
def test_history_keeps_error_texts_that_str_splitlines_would_split(store: Store, text: str) -> None:
    """Regression: SQLite kept recent history as JSON lines split with str.splitlines,
    which also splits at these characters, so history() raised a JSONDecodeError."""
    setup(store)
    lease = plan_and_lease(store)
    store.fail(lease, text, retryable=True, delay=0.0)
    lease = store.lease_next("w2")
    assert lease is not None
    store.cancel(lease.job_id, text)
    details = [h.detail for h in store.history(lease.job_id)]
    assert {"error": text, "retry_at": details[-3]["retry_at"]} in details
    assert details[-1] == {"reason": text}
    assert store.job(lease.job_id).last_error == text


def test_an_identity_with_a_lone_surrogate_is_an_invalid_identity(store: Store) -> None:
    """No canonical encoding exists, so no key: InvalidIdentity (not a UnicodeEncodeError),
    from plan and from plan_many's fast path for plain dicts alike, and nothing planned."""
    setup(store)
    with pytest.raises(InvalidIdentity, match="lone surrogate"):
        store.plan("linear", {"path": "caf\udce9.txt"})
    with pytest.raises(InvalidIdentity, match="lone surrogate"):
        store.plan_many("linear", [{"n": 1}, {"\udce9": 2}])
    with pytest.raises(InvalidIdentity, match="lone surrogate"):
        store.plan_many("linear", [Plan({"n": 1}, payload=1), Plan({"n": "\udce9"})])
    assert store.jobs() == []


def test_extras_with_a_lone_surrogate_are_an_invalid_identity(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    with pytest.raises(InvalidIdentity, match="lone surrogate"):
        store.run_effect(lease, "op", lambda ctx: 1, extras={"file": "caf\udce9"})
    assert store.effects(lease.job_id) == []


def test_nesting_is_limited_by_json_depth_limit(store_factory: StoreFactory) -> None:
    """Python's json recurses, so the deepest value that encodes and decodes depended on
    the caller's stack; the model makes the limit explicit configuration."""
    store = store_factory(config=Config(json_depth_limit=3))
    setup(store)
    store.plan("linear", {"n": 1}, payload=nest(1, 3))
    with pytest.raises(InvalidPayload, match="more than 3 deep"):
        store.plan("linear", {"n": 2}, payload=nest(1, 4, as_list=False))
    lease = store.lease_next("w")
    assert lease is not None
    assert store.run_effect(lease, "ok", lambda ctx: nest("x", 3)) == nest("x", 3)
    with pytest.raises(EffectResultError, match="more than 3 deep"):
        store.run_effect(lease, "deep", lambda ctx: nest("x", 4))
    statuses = {e.op: e.status for e in store.effects(lease.job_id)}
    assert statuses == {"ok": EffectStatus.DONE, "deep": EffectStatus.IN_DOUBT}


def test_a_payload_that_contains_itself_is_refused_not_looped_over(store: Store) -> None:
    setup(store)
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(InvalidPayload):
        store.plan("linear", {"n": 1}, payload=loop)


def test_json_depth_limit_is_configuration() -> None:
    config, sources = load_config(
        config_file=None, env={"JOBLEDGER_JSON_DEPTH_LIMIT": "7"}, overrides={}
    )
    assert config.json_depth_limit == 7
    assert sources["json_depth_limit"] == "JOBLEDGER_JSON_DEPTH_LIMIT"
    assert Config().json_depth_limit == 128
    with pytest.raises(ConfigError, match="json_depth_limit"):
        Config(json_depth_limit=0)


def test_storable_text_escapes_exactly_what_check_text_refuses() -> None:
    assert storable_text("ok \u2028 \U0001f600") == "ok \u2028 \U0001f600"
    escaped = storable_text("a\x00b caf\udce9")
    assert escaped == "a\\x00b caf\\udce9"
    assert check_text(escaped, name="error") == escaped


def test_the_worker_records_an_exception_whose_text_no_store_accepts() -> None:
    """A handler's exception may carry a NUL or the surrogates of an undecodable file
    name; the worker escapes them, so the failure is recorded instead of the worker's own
    fail() being refused."""
    store = MemoryStore(clock=ManualClock())
    setup(store)
    jid = store.plan("linear", {"n": 1})

    def handler(ctx: impl.JobContext) -> None:
        raise OSError("cannot open caf\udce9.txt: \x00")

    assert impl.Worker(store, {"linear": handler}).run_once() is True
    assert store.job(jid).last_error == "OSError: cannot open caf\\udce9.txt: \\x00"
    assert [h.event for h in store.history(jid)][-1] is Event.FAILED
