"""``run_effect(..., then=state)``: the result and the advance that follows it, as one step.

``then`` is ``advance(lease, then)`` taken in the transaction that records (or replays)
the effect's result, so a crash cannot fall between the two and the job spends one
commit where two calls spend two. Its rules are ``advance``'s, checked before ``fn`` runs;
everything an effect does without ``then`` it does with it.
"""

from __future__ import annotations

import pytest

import impl
from model import DoubtInfo, EffectContext, EffectStatus, Lease, ManualClock, Store

from .flows import BRANCH, events, expire, plan_and_lease, setup, snapshot
from .test_effect import Counter, _die_during_effect


def test_then_records_the_result_and_advances_together(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    clock.advance(1)
    assert store.run_effect(lease, "HEAD", Counter({"n": 1}), then="A") == {"n": 1}
    info = store.job(lease.job_id)
    assert (info.state, info.lease is not None) == ("A", True)
    (effect,) = store.effects(lease.job_id)
    assert (effect.status, effect.result) == (EffectStatus.DONE, {"n": 1})
    history = store.history(lease.job_id)
    assert [str(e.event) for e in history[-3:]] == [
        "effect_started",
        "effect_recorded",
        "advanced",
    ]
    recorded, advanced = history[-2:]
    assert advanced.detail == {"from": "NEW", "to": "A"}
    assert (advanced.token, advanced.worker) == (lease.token, lease.worker)
    # One atomic step: the result and the move carry the same time.
    assert recorded.at == advanced.at == effect.finished_at


def test_then_to_a_terminal_state_ends_the_lease(store: Store, clock: ManualClock) -> None:
    setup(store, BRANCH)
    lease = plan_and_lease(store, kind="branch")
    store.run_effect(lease, "check", Counter(None), then="SKIPPED")
    info = store.job(lease.job_id)
    assert (info.state, info.lease) == ("SKIPPED", None)
    assert store.leases() == []
    assert store.lease_next("w2") is None
    with pytest.raises(impl.LeaseLost):
        store.run_effect(lease, "more", Counter(None))


@pytest.mark.parametrize(
    "then",
    [
        pytest.param("NOPE", id="unknown-state"),
        pytest.param("FAILED", id="failed-state"),
        pytest.param("B", id="no-edge"),
    ],
)
def test_a_then_advance_would_refuse_stops_before_fn(store: Store, then: str) -> None:
    setup(store)
    lease = plan_and_lease(store)
    before = snapshot(store, lease.job_id)
    fn = Counter("never")
    with pytest.raises(impl.IllegalTransition) as info:
        store.run_effect(lease, "op", fn, then=then)
    assert then in str(info.value)
    assert fn.calls == []
    assert snapshot(store, lease.job_id) == before


@pytest.mark.parametrize("then", ["NEW", "A"], ids=["current", "passed"])
def test_then_to_a_reached_state_records_and_moves_nothing(
    store: Store, clock: ManualClock, then: str
) -> None:
    setup(store)
    lease = plan_and_lease(store)
    if then == "A":
        assert store.advance(lease, "A")
        assert store.advance(lease, "B")
    state = store.state(lease.job_id)
    assert store.run_effect(lease, "op", Counter(7), then=then) == 7
    assert store.state(lease.job_id) == state
    assert events(store, lease.job_id)[-2:] == ["effect_started", "effect_recorded"]


def test_a_replay_with_then_takes_the_edge_without_running_fn(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    assert store.run_effect(lease, "HEAD", Counter("first")) == "first"
    again = Counter("second")
    assert store.run_effect(lease, "HEAD", again, then="A") == "first"
    assert again.calls == []
    assert store.state(lease.job_id) == "A"
    assert events(store, lease.job_id)[-2:] == ["effect_recorded", "advanced"]
    # And once more: the result replays, the state has been reached, nothing is written.
    before = snapshot(store, lease.job_id)
    assert store.run_effect(lease, "HEAD", again, then="A") == "first"
    assert snapshot(store, lease.job_id) == before


def test_fn_raising_with_then_moves_nothing(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    before = store.job(lease.job_id)

    def boom(ctx: EffectContext) -> object:
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        store.run_effect(lease, "op", boom, then="A")
    assert store.job(lease.job_id) == before
    assert store.effects(lease.job_id) == []


def test_an_unrecordable_result_with_then_moves_nothing(store: Store) -> None:
    setup(store)
    lease = plan_and_lease(store)
    with pytest.raises(impl.EffectResultError):
        store.run_effect(lease, "op", Counter(float("nan")), then="A")
    assert store.state(lease.job_id) == "NEW"
    (effect,) = store.effects(lease.job_id)
    assert effect.status == EffectStatus.IN_DOUBT


def test_a_lease_lost_during_fn_moves_nothing(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)

    def slow(ctx: EffectContext) -> object:
        expire(clock, lease)
        return "late"

    with pytest.raises(impl.LeaseLost):
        store.run_effect(lease, "op", slow, then="A")
    assert store.state(lease.job_id) == "NEW"
    (effect,) = store.effects(lease.job_id)
    assert effect.status == EffectStatus.STARTED
    assert "advanced" not in events(store, lease.job_id)


def _doubt(store: Store, clock: ManualClock) -> Lease:
    """Leave op PUSH started by a lease that died; return the next lease of the job."""
    return _die_during_effect(store, clock)[0]


def test_a_probe_answer_with_then_is_recorded_and_advances(
    store: Store, clock: ManualClock
) -> None:
    later = _doubt(store, clock)
    seen: list[DoubtInfo] = []

    def probe(info: DoubtInfo) -> object:
        seen.append(info)
        return {"found": True}

    fn = Counter("never")
    assert store.run_effect(later, "PUSH", fn, on_doubt=probe, then="A") == {"found": True}
    assert (len(seen), fn.calls) == (1, [])
    assert store.state(later.job_id) == "A"
    assert events(store, later.job_id)[-3:] == ["effect_in_doubt", "effect_recorded", "advanced"]


def test_a_retried_doubt_with_then_runs_again_and_advances(
    store: Store, clock: ManualClock
) -> None:
    later = _doubt(store, clock)
    fn = Counter("again")
    assert store.run_effect(later, "PUSH", fn, then="A") == "again"
    assert len(fn.calls) == 1
    assert store.state(later.job_id) == "A"
    assert events(store, later.job_id)[-4:] == [
        "effect_in_doubt",
        "effect_started",
        "effect_recorded",
        "advanced",
    ]


def test_raise_on_doubt_with_then_moves_nothing(store: Store, clock: ManualClock) -> None:
    later = _doubt(store, clock)
    before = snapshot(store, later.job_id)
    with pytest.raises(impl.EffectInDoubt):
        store.run_effect(later, "PUSH", Counter("never"), on_doubt="raise", then="A")
    assert snapshot(store, later.job_id) == before


def test_a_then_that_fn_made_illegal_keeps_the_result(store: Store) -> None:
    """``fn`` moved the job itself, past ``then``'s source: the result is recorded (the
    effect happened) and ``IllegalTransition`` says why the state did not move, as
    ``run_effect`` followed by ``advance`` would."""
    setup(store, BRANCH)
    lease = plan_and_lease(store, kind="branch")

    def moves(ctx: EffectContext) -> object:
        assert store.advance(lease, "MID")
        return "done"

    with pytest.raises(impl.IllegalTransition):
        store.run_effect(lease, "op", moves, then="SKIPPED")
    assert store.state(lease.job_id) == "MID"
    (effect,) = store.effects(lease.job_id)
    assert (effect.status, effect.result) == (EffectStatus.DONE, "done")
    assert store.run_effect(lease, "op", Counter("never"), then="LEFT") == "done"
    assert store.state(lease.job_id) == "LEFT"


def test_a_stale_lease_with_then_changes_nothing(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    expire(clock, lease)
    later = store.lease_next("w2")
    assert later is not None
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.LeaseLost):
        store.run_effect(lease, "op", Counter("x"), then="A")
    assert snapshot(store, lease.job_id) == before
