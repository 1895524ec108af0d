"""Effects: run at least once, recorded exactly once, replayed without running again.

The start of an effect is committed before ``fn`` runs and the result after, fenced by
the lease. A start whose lease died leaves the op *in doubt*: the next caller decides,
through ``on_doubt``, whether to run again, stop, or probe the world.
"""

from __future__ import annotations

import math

import attrs
import pytest

import impl
from model import (
    Config,
    DoubtInfo,
    EffectContext,
    EffectStatus,
    Event,
    Lease,
    ManualClock,
    Store,
)

from .flows import StoreFactory, events, expire, plan_and_lease, setup, snapshot


class Counter:
    """An effect that counts its calls and returns ``result``."""

    def __init__(self, result: object = None) -> None:
        self.calls: list[EffectContext] = []
        self.result = result

    def __call__(self, ctx: EffectContext) -> object:
        self.calls.append(ctx)
        return self.result


def test_effect_runs_once_and_replays_its_result(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    fn = Counter({"bytes": 10, "etag": "x"})
    clock.advance(1)
    assert store.run_effect(lease, "HEAD", fn) == {"bytes": 10, "etag": "x"}
    clock.advance(1)
    again = Counter("other")
    assert store.run_effect(lease, "HEAD", again) == {"bytes": 10, "etag": "x"}
    assert len(fn.calls) == 1
    assert again.calls == []
    (effect,) = store.effects(lease.job_id)
    assert (effect.job_id, effect.op, effect.op_key) == (
        lease.job_id,
        "HEAD",
        impl.op_key(lease.job_id, "HEAD"),
    )
    assert (effect.status, effect.result, effect.token, effect.started_by) == (
        EffectStatus.DONE,
        {"bytes": 10, "etag": "x"},
        1,
        "w1",
    )
    assert (effect.started_at, effect.finished_at) == (clock() - 1, clock() - 1)
    assert events(store, lease.job_id) == ["planned", "leased", "effect_started", "effect_recorded"]


def test_recorded_result_survives_later_leases(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.run_effect(lease, "HEAD", Counter(1))
    expire(clock, lease)
    later = store.lease_next("w2")
    assert later is not None
    fn = Counter(2)
    assert store.run_effect(later, "HEAD", fn) == 1
    assert fn.calls == []


def test_first_run_and_replay_return_equal_values(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    first = store.run_effect(lease, "op", Counter({"t": (1, 2), "s": "é"}))
    replay = store.run_effect(lease, "op", Counter())
    assert first == replay == {"t": [1, 2], "s": "é"}


def test_none_is_a_result_too(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    assert store.run_effect(lease, "op", Counter(None)) is None
    fn = Counter(5)
    assert store.run_effect(lease, "op", fn) is None
    assert fn.calls == []


def test_effect_context_fields(store: Store, clock: ManualClock) -> None:
    setup(store)
    first = plan_and_lease(store)
    store.release(first)
    store.lease_next("w1")
    expire(clock, store.job(first.job_id).lease)  # type: ignore[arg-type]
    lease = store.lease_next("w2")
    assert lease is not None
    fn = Counter()
    store.run_effect(lease, "STREAM", fn, extras={"part": 3})
    assert fn.calls == [
        EffectContext(
            job_id=lease.job_id,
            op="STREAM",
            op_key=impl.op_key(lease.job_id, "STREAM", {"part": 3}),
            token=3,
            attempt=2,
        )
    ]
    assert (lease.token, lease.attempt) == (3, 2)


@pytest.mark.parametrize("claimed", [1, 7, -1, 2**70, "2", None])
def test_the_effect_attempt_is_the_jobs_whatever_the_lease_object_says(
    store: Store, claimed: object
) -> None:
    """The attempt comes from the ledger: a Lease edited by the caller (its token still
    live) changes neither the context's attempt nor what is recorded."""
    setup(store)
    lease = plan_and_lease(store)
    assert store.job(lease.job_id).attempts == lease.attempt == 1
    edited = attrs.evolve(lease)
    object.__setattr__(edited, "attempt", claimed)  # Lease is frozen; a caller could
    fn = Counter("r")
    assert store.run_effect(edited, "op", fn) == "r"
    (ctx,) = fn.calls
    assert (ctx.token, ctx.attempt) == (lease.token, lease.attempt)


def test_extras_make_distinct_ops(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    assert store.run_effect(lease, "PART", Counter("a"), extras={"n": 1}) == "a"
    assert store.run_effect(lease, "PART", Counter("b"), extras={"n": 2}) == "b"
    assert store.run_effect(lease, "PART", Counter("c"), extras={"n": True}) == "c"
    assert store.run_effect(lease, "PART", Counter("d")) == "d"
    assert store.run_effect(lease, "PART", Counter("e"), extras={}) == "d"
    effects = store.effects(lease.job_id)
    assert [(e.result, dict(e.extras)) for e in effects] == [
        ("a", {"n": 1}),
        ("b", {"n": 2}),
        ("c", {"n": True}),
        ("d", {}),
    ]
    assert len({e.op_key for e in effects}) == 4


def test_fn_raising_removes_the_start_and_propagates(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    error = RuntimeError("network down")

    def boom(ctx: EffectContext) -> object:
        raise error

    with pytest.raises(RuntimeError) as info:
        store.run_effect(lease, "HEAD", boom)
    assert info.value is error
    assert store.effects(lease.job_id) == []
    assert store.job(lease.job_id).lease is not None
    # Not in doubt: the caller knows it did not finish, so on_doubt is not consulted.
    fn = Counter("ok")
    assert store.run_effect(lease, "HEAD", fn, on_doubt="raise") == "ok"
    assert len(fn.calls) == 1
    assert events(store, lease.job_id) == [
        "planned",
        "leased",
        "effect_started",
        "effect_started",
        "effect_recorded",
    ]
    assert store.stats().in_doubt == 0


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(object(), id="object"),
        pytest.param({"x": math.nan}, id="nan"),
        pytest.param(math.inf, id="inf"),
        pytest.param({"x": {1, 2}}, id="set"),
        pytest.param(b"bytes", id="bytes"),
        # A replay would return {"1": "a"}, not what fn returned.
        pytest.param({1: "a"}, id="int-key"),
    ],
)
def test_result_that_is_not_json_is_refused_and_leaves_doubt(store: Store, bad: object) -> None:
    setup(store)
    lease = plan_and_lease(store)
    with pytest.raises(impl.EffectResultError) as info:
        store.run_effect(lease, "op", Counter(bad))
    assert isinstance(info.value, ValueError)
    (effect,) = store.effects(lease.job_id)
    assert (effect.status, effect.result, effect.finished_at) == (EffectStatus.IN_DOUBT, None, None)
    assert events(store, lease.job_id)[-2:] == ["effect_started", "effect_in_doubt"]
    assert store.stats().in_doubt == 1
    with pytest.raises(impl.EffectInDoubt):
        store.run_effect(lease, "op", Counter("never"), on_doubt="raise")


def test_result_limit_is_on_encoded_bytes(store_factory: StoreFactory) -> None:
    store = setup(store_factory(config=Config(result_limit=10)))
    lease = plan_and_lease(store)
    assert store.run_effect(lease, "fits", Counter("abcdefgh")) == "abcdefgh"  # '"abcdefgh"'
    with pytest.raises(impl.EffectResultError) as info:
        store.run_effect(lease, "too-big", Counter("abcdefghi"))
    assert "10" in str(info.value)
    statuses = {e.op: e.status for e in store.effects(lease.job_id)}
    assert statuses == {"fits": EffectStatus.DONE, "too-big": EffectStatus.IN_DOUBT}
    # Never truncated: the oversized result is nowhere.
    assert [e.result for e in store.effects(lease.job_id)] == ["abcdefgh", None]


def _die_during_effect(store: Store, clock: ManualClock) -> tuple[Lease, Counter]:
    """Start an effect under worker w1 whose lease expires while ``fn`` runs."""
    setup(store)
    lease = plan_and_lease(store, worker="w1")

    def slow(ctx: EffectContext) -> object:
        expire(clock, lease)
        return "first"

    with pytest.raises(impl.LeaseLost):
        store.run_effect(lease, "PUSH", slow)
    (effect,) = store.effects(lease.job_id)
    assert (effect.status, effect.token, effect.started_by) == (EffectStatus.STARTED, 1, "w1")
    later = store.lease_next("w2")
    assert later is not None
    assert later.token == 2
    return later, Counter("second")


def test_in_doubt_retry_runs_fn_again(store: Store, clock: ManualClock) -> None:
    later, fn = _die_during_effect(store, clock)
    assert store.run_effect(later, "PUSH", fn) == "second"
    assert len(fn.calls) == 1
    (effect,) = store.effects(later.job_id)
    assert (effect.status, effect.result, effect.token, effect.started_by) == (
        EffectStatus.DONE,
        "second",
        2,
        "w2",
    )
    assert events(store, later.job_id)[-4:] == [
        "leased",
        "effect_in_doubt",
        "effect_started",
        "effect_recorded",
    ]


def test_in_doubt_raise_raises_and_changes_nothing(store: Store, clock: ManualClock) -> None:
    later, fn = _die_during_effect(store, clock)
    before = snapshot(store, later.job_id)
    with pytest.raises(impl.EffectInDoubt) as info:
        store.run_effect(later, "PUSH", fn, on_doubt="raise")
    err = info.value
    assert (err.job_id, err.op, err.op_key, err.started_token, err.started_by) == (
        later.job_id,
        "PUSH",
        impl.op_key(later.job_id, "PUSH"),
        1,
        "w1",
    )
    assert fn.calls == []
    assert snapshot(store, later.job_id) == before


def test_in_doubt_probe_result_is_recorded(store: Store, clock: ManualClock) -> None:
    later, fn = _die_during_effect(store, clock)
    started_at = store.effects(later.job_id)[0].started_at
    seen: list[DoubtInfo] = []

    def probe(info: DoubtInfo) -> object:
        seen.append(info)
        return {"found": True}

    assert store.run_effect(later, "PUSH", fn, on_doubt=probe) == {"found": True}
    assert fn.calls == []
    assert seen == [
        DoubtInfo(
            job_id=later.job_id,
            op="PUSH",
            op_key=impl.op_key(later.job_id, "PUSH"),
            started_at=started_at,
            started_token=1,
            started_by="w1",
        )
    ]
    (effect,) = store.effects(later.job_id)
    assert (effect.status, effect.result, effect.token) == (EffectStatus.DONE, {"found": True}, 2)
    assert events(store, later.job_id)[-3:] == ["leased", "effect_in_doubt", "effect_recorded"]
    assert store.run_effect(later, "PUSH", fn) == {"found": True}
    assert fn.calls == []


def test_in_doubt_probe_returning_none_runs_fn(store: Store, clock: ManualClock) -> None:
    later, fn = _die_during_effect(store, clock)
    probes: list[DoubtInfo] = []
    assert store.run_effect(later, "PUSH", fn, on_doubt=probes.append) == "second"
    assert len(probes) == 1
    assert len(fn.calls) == 1
    assert store.effects(later.job_id)[0].status == EffectStatus.DONE
    assert events(store, later.job_id)[-4:] == [
        "leased",
        "effect_in_doubt",
        "effect_started",
        "effect_recorded",
    ]


def test_lost_lease_never_records_a_result(store: Store, clock: ManualClock) -> None:
    later, _ = _die_during_effect(store, clock)
    assert "effect_recorded" not in events(store, later.job_id)
    assert store.stats().in_doubt == 1


@pytest.mark.parametrize(("op", "extras"), [("", None), ("op", {"x": 1.5})])
def test_a_dead_lease_is_reported_before_a_bad_op(
    store: Store, clock: ManualClock, op: str, extras: dict[str, object] | None
) -> None:
    """The lease is checked first, as in the model: a caller whose lease died learns that,
    whatever else is wrong with the call; with a live lease the bad op is refused."""
    setup(store)
    lease = plan_and_lease(store)
    fn = Counter()
    with pytest.raises(impl.InvalidIdentity):
        store.run_effect(lease, op, fn, extras=extras)  # type: ignore[arg-type]
    expire(clock, lease)
    with pytest.raises(impl.LeaseLost):
        store.run_effect(lease, op, fn, extras=extras)  # type: ignore[arg-type]
    assert fn.calls == []
    assert store.effects(lease.job_id) == []


def test_bad_on_doubt_is_refused(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    fn = Counter()
    with pytest.raises(impl.InvalidInput):
        store.run_effect(lease, "op", fn, on_doubt="ignore")  # type: ignore[arg-type]
    assert fn.calls == []
    assert store.effects(lease.job_id) == []


def test_effect_history_names_the_op(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.run_effect(lease, "HEAD", Counter(1))
    tail = [(str(e.event), dict(e.detail), e.token, e.worker) for e in store.history(lease.job_id)][
        -2:
    ]
    assert tail == [
        (Event.EFFECT_STARTED, {"op": "HEAD"}, 1, "w1"),
        (Event.EFFECT_RECORDED, {"op": "HEAD"}, 1, "w1"),
    ]


def test_effects_do_not_touch_the_job_row(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    before = store.job(lease.job_id)
    clock.advance(2)
    store.run_effect(lease, "X", Counter(1))
    assert store.job(lease.job_id) == before


def test_retried_doubt_keeps_the_effect_order(store: Store, clock: ManualClock) -> None:
    later, fn = _die_during_effect(store, clock)
    store.run_effect(later, "OTHER", Counter("o"))
    clock.advance(1)
    store.run_effect(later, "PUSH", fn)
    effects = store.effects(later.job_id)
    assert [(e.op, e.status, e.token, e.started_by) for e in effects] == [
        ("PUSH", EffectStatus.DONE, 2, "w2"),
        ("OTHER", EffectStatus.DONE, 2, "w2"),
    ]
    assert effects[0].started_at == effects[0].finished_at == clock()


def test_probe_returning_a_bad_result_records_nothing(store: Store, clock: ManualClock) -> None:
    later, fn = _die_during_effect(store, clock)
    before = snapshot(store, later.job_id)
    with pytest.raises(impl.EffectResultError):
        store.run_effect(later, "PUSH", fn, on_doubt=lambda info: {"bad": math.nan})
    assert fn.calls == []
    assert snapshot(store, later.job_id) == before


def test_probe_raising_propagates_and_records_nothing(store: Store, clock: ManualClock) -> None:
    later, fn = _die_during_effect(store, clock)
    before = snapshot(store, later.job_id)

    def probe(info: DoubtInfo) -> object:
        raise ConnectionError("cannot reach the target")

    with pytest.raises(ConnectionError):
        store.run_effect(later, "PUSH", fn, on_doubt=probe)
    assert fn.calls == []
    assert snapshot(store, later.job_id) == before


def test_probe_outliving_the_lease_records_nothing(store: Store, clock: ManualClock) -> None:
    later, fn = _die_during_effect(store, clock)
    before = (store.effects(later.job_id), store.history(later.job_id))

    def probe(info: DoubtInfo) -> object:
        expire(clock, later)
        return "found"

    with pytest.raises(impl.LeaseLost):
        store.run_effect(later, "PUSH", fn, on_doubt=probe)
    assert (store.effects(later.job_id), store.history(later.job_id)) == before
    assert fn.calls == []


def test_taken_over_effect_keeps_the_new_holders_result(store: Store, clock: ManualClock) -> None:
    """w1 stalls inside fn; w2 takes the job and completes the same op; w1 comes back."""
    setup(store)
    first = plan_and_lease(store, worker="w1")
    taken: list[Lease] = []

    def stalls(ctx: EffectContext) -> object:
        expire(clock, first)
        second = store.lease_next("w2")
        assert second is not None
        taken.append(second)
        assert store.run_effect(second, "PUSH", Counter("from w2")) == "from w2"
        return "from w1"

    with pytest.raises(impl.LeaseLost):
        store.run_effect(first, "PUSH", stalls)
    (effect,) = store.effects(first.job_id)
    assert (effect.status, effect.result, effect.token, effect.started_by) == (
        EffectStatus.DONE,
        "from w2",
        2,
        "w2",
    )
    assert store.run_effect(taken[0], "PUSH", Counter("again")) == "from w2"


def test_raising_after_a_takeover_leaves_the_new_start(store: Store, clock: ManualClock) -> None:
    setup(store)
    first = plan_and_lease(store, worker="w1")
    inner: list[EffectContext] = []

    def stalls(ctx: EffectContext) -> object:
        expire(clock, first)
        second = store.lease_next("w2")
        assert second is not None

        def also_stalls(ctx2: EffectContext) -> object:
            inner.append(ctx2)
            raise RuntimeError("w1 gives up")

        # w2 starts the op (w1's start is in doubt, so it retries) and w1's fn fails
        # while w2's start is the recorded one: w1 must not remove w2's start.
        with pytest.raises(RuntimeError):
            store.run_effect(second, "PUSH", also_stalls)
        store.run_effect(second, "PUSH", lambda c: (_ for _ in ()).throw(KeyError("x")))
        return None

    with pytest.raises(KeyError):
        store.run_effect(first, "PUSH", stalls)
    assert len(inner) == 1
    assert store.effects(first.job_id) == []
