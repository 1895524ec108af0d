"""Planning: one job per key, idempotent, all-or-nothing batches, validated input."""

from __future__ import annotations

import math

import pytest

import impl
from model import Config, Event, ManualClock, Plan, Store

from .flows import LINEAR, StoreFactory, setup


def test_plan_returns_the_job_key_and_a_fresh_job(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, payload={"url": "u", "size": [1, 2]})
    assert job_id == impl.job_key("linear", {"n": 1})
    job = store.job(job_id)
    assert job.job_id == job_id
    assert job.kind == "linear"
    assert job.identity == {"n": 1}
    assert job.payload == {"url": "u", "size": [1, 2]}
    assert job.state == "NEW"
    assert job.attempts == 0
    assert job.max_attempts == 5
    assert job.priority == 0
    assert job.run_at == clock()
    assert job.token == 0
    assert job.lease is None
    assert job.last_error is None
    assert job.created_at == clock()
    assert job.updated_at == clock()
    assert store.state(job_id) == "NEW"


def test_plan_options_are_stored(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, priority=7, max_attempts=2, run_at=clock() + 60)
    job = store.job(job_id)
    assert (job.priority, job.max_attempts, job.run_at) == (7, 2, clock() + 60)


def test_default_max_attempts_comes_from_the_config(store_factory: StoreFactory) -> None:
    store = setup(store_factory(config=Config(max_attempts=3)))
    assert store.job(store.plan("linear", {"n": 1})).max_attempts == 3


def test_plan_is_idempotent_and_changes_nothing(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, payload={"a": 1})
    before = store.job(job_id)
    history = store.history(job_id)
    clock.advance(10)
    # Other options are ignored on a replan: the job is already what it is.
    again = store.plan("linear", {"n": 1}, payload={"a": 1}, priority=9, max_attempts=1)
    assert again == job_id
    assert store.job(job_id) == before
    assert store.history(job_id) == history
    assert len(store.jobs()) == 1


def test_plan_of_a_job_that_moved_on_returns_its_id(store: Store) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    lease = store.lease_next("w1")
    assert lease is not None
    store.advance(lease, "A")
    assert store.plan("linear", {"n": 1}) == job_id
    assert store.state(job_id) == "A"


def test_same_key_different_payload_conflicts(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, payload={"a": 1})
    before = store.job(job_id)
    clock.advance(1)
    with pytest.raises(impl.IdempotencyConflict) as info:
        store.plan("linear", {"n": 1}, payload={"a": 2})
    assert job_id in str(info.value) or "payload" in str(info.value)
    with pytest.raises(impl.IdempotencyConflict):
        store.plan("linear", {"n": 1})
    assert store.job(job_id) == before


def test_payload_key_order_is_not_a_conflict(store: Store) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1}, payload={"a": 1, "b": 2})
    assert store.plan("linear", {"n": 1}, payload={"b": 2, "a": 1}) == job_id


def test_plan_of_an_unknown_kind_raises(store: Store) -> None:
    with pytest.raises(impl.UnknownWorkflow) as info:
        store.plan("nope", {"n": 1})
    assert isinstance(info.value, LookupError)
    assert "nope" in str(info.value)
    assert store.jobs() == []


@pytest.mark.parametrize(
    ("options", "error"),
    [
        pytest.param({"payload": math.nan}, impl.InvalidPayload, id="nan-payload"),
        # json.dumps would turn the int key into "1": refused so nothing is coerced.
        pytest.param({"payload": {1: "a"}}, impl.InvalidPayload, id="int-key-payload"),
        pytest.param(
            {"payload": {"x": [{"ok": 1}, {2: "b"}]}}, impl.InvalidPayload, id="nested-int-key"
        ),
        pytest.param({"priority": 2**63}, impl.InvalidInput, id="priority-over-int64"),
        pytest.param({"priority": -(2**63) - 1}, impl.InvalidInput, id="priority-under-int64"),
        pytest.param({"max_attempts": 2**63}, impl.InvalidInput, id="attempts-over-int64"),
        pytest.param({"payload": object()}, impl.InvalidPayload, id="object-payload"),
        pytest.param({"priority": True}, impl.InvalidInput, id="bool-priority"),
        pytest.param({"priority": 1.5}, impl.InvalidInput, id="float-priority"),
        pytest.param({"max_attempts": 0}, impl.InvalidInput, id="zero-attempts"),
        pytest.param({"max_attempts": True}, impl.InvalidInput, id="bool-attempts"),
        pytest.param({"run_at": "soon"}, impl.InvalidInput, id="str-run-at"),
    ],
)
def test_bad_plan_options_are_rejected(
    store: Store, options: dict[str, object], error: type[Exception]
) -> None:
    setup(store)
    with pytest.raises(error) as info:
        store.plan("linear", {"n": 1}, **options)  # type: ignore[arg-type]
    assert isinstance(info.value, impl.InvalidInput)
    assert isinstance(info.value, ValueError)
    assert store.jobs() == []


def test_plan_records_history(store: Store, clock: ManualClock) -> None:
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    (event,) = store.history(job_id)
    assert event.event == Event.PLANNED
    assert (event.job_id, event.at, event.token, event.worker) == (job_id, clock(), 0, None)


def test_plan_many_returns_ids_in_item_order(store: Store, clock: ManualClock) -> None:
    setup(store)
    ids = store.plan_many(
        "linear",
        [
            {"n": 3},
            Plan({"n": 1}, payload="p", priority=4, max_attempts=2, run_at=clock() + 5),
            {"n": 2},
        ],
    )
    assert ids == [impl.job_key("linear", {"n": n}) for n in (3, 1, 2)]
    assert [j.job_id for j in store.jobs()] == ids
    job = store.job(ids[1])
    assert (job.payload, job.priority, job.max_attempts, job.run_at) == ("p", 4, 2, clock() + 5)
    assert store.job(ids[0]).payload is None


def test_plan_many_repeats_and_existing_jobs_return_the_same_id(store: Store) -> None:
    setup(store)
    existing = store.plan("linear", {"n": 1})
    ids = store.plan_many("linear", [{"n": 2}, {"n": 1}, {"n": 2}])
    assert ids == [impl.job_key("linear", {"n": 2}), existing, impl.job_key("linear", {"n": 2})]
    assert len(store.jobs()) == 2


def test_plan_many_with_some_jobs_planned_before_plans_only_the_new_ones(
    store: Store, clock: ManualClock
) -> None:
    setup(store)
    existing = store.plan("linear", {"n": 1}, payload="a")
    planned_at = store.job(existing).created_at
    clock.advance(5.0)
    ids = store.plan_many("linear", [{"n": 2}, Plan({"n": 1}, payload="a"), {"n": 3}])
    assert ids[1] == existing
    assert [j.job_id for j in store.jobs()] == [existing, ids[0], ids[2]]
    assert store.job(existing).created_at == planned_at
    assert [h.event for h in store.history(existing)] == [impl.Event.PLANNED]
    assert [h.at for h in store.history(ids[2])] == [planned_at + 5.0]


def test_plan_many_is_all_or_nothing_on_a_conflict_with_a_stored_job(store: Store) -> None:
    setup(store)
    existing = store.plan("linear", {"n": 1}, payload="a")
    with pytest.raises(impl.IdempotencyConflict):
        store.plan_many("linear", [{"n": 2}, Plan({"n": 1}, payload="b"), {"n": 3}])
    assert [j.job_id for j in store.jobs()] == [existing]


def test_plan_many_is_all_or_nothing_on_a_conflict_inside_the_batch(store: Store) -> None:
    setup(store)
    with pytest.raises(impl.IdempotencyConflict):
        store.plan_many(
            "linear", [Plan({"n": 1}, payload="a"), {"n": 2}, Plan({"n": 1}, payload="b")]
        )
    assert store.jobs() == []


def test_plan_many_is_all_or_nothing_on_a_bad_identity(store: Store) -> None:
    setup(store)
    with pytest.raises(impl.InvalidIdentity):
        store.plan_many("linear", [{"n": 1}, {"n": 1.5}])
    assert store.jobs() == []


def test_plan_many_of_nothing_plans_nothing(store: Store) -> None:
    setup(store)
    assert store.plan_many("linear", []) == []
    assert store.jobs() == []


def test_unknown_job_reads_raise(store: Store) -> None:
    missing = "f" * 64
    for read in (store.state, store.job, store.history, store.effects):
        with pytest.raises(impl.UnknownJob) as info:
            read(missing)
        assert isinstance(info.value, LookupError)
        assert missing in str(info.value)


def test_jobs_lists_in_planned_order_with_filters(store: Store) -> None:
    setup(store, LINEAR, impl.DOWNLOAD)
    a = store.plan("linear", {"n": 2})
    b = store.plan("download", {"n": 1})
    c = store.plan("linear", {"n": 1})
    lease = store.lease_next("w1", kinds=["linear"])
    assert lease is not None
    assert lease.job_id == a
    store.advance(lease, "A")
    assert [j.job_id for j in store.jobs()] == [a, b, c]
    assert [j.job_id for j in store.jobs(kind="linear")] == [a, c]
    assert [j.job_id for j in store.jobs(state="NEW")] == [c]
    assert [j.job_id for j in store.jobs(limit=2)] == [a, b]
    assert [j.job_id for j in store.jobs(newest_first=True)] == [c, b, a]


def test_the_int64_edges_are_stored_exactly(store: Store) -> None:
    setup(store)
    low = store.plan("linear", {"n": 1}, priority=-(2**63), max_attempts=2**63 - 1)
    high = store.plan("linear", {"n": 2}, priority=2**63 - 1)
    assert (store.job(low).priority, store.job(low).max_attempts) == (-(2**63), 2**63 - 1)
    assert store.job(high).priority == 2**63 - 1


@pytest.mark.parametrize(
    "call",
    [
        pytest.param("lease_next", id="worker"),
        pytest.param("fail", id="error"),
        pytest.param("cancel", id="reason"),
        pytest.param("run_effect", id="op"),
    ],
)
def test_nul_in_strings_round_trips_or_is_invalid_input(store: Store, call: str) -> None:
    """A NUL character is valid in a Python str; a backend that cannot keep it must say
    so as bad input, not as a storage failure."""
    setup(store)
    job_id = store.plan("linear", {"n": 1})
    text = "a\x00b"
    try:
        if call == "lease_next":
            lease = store.lease_next(text)
            assert lease is not None
            assert store.job(job_id).lease_worker == text
        elif call == "cancel":
            store.cancel(job_id, text)
            assert store.job(job_id).last_error == text
        else:
            lease = store.lease_next("w1")
            assert lease is not None
            if call == "fail":
                store.fail(lease, text)
                assert store.job(job_id).last_error == text
            else:
                assert store.run_effect(lease, text, lambda ctx: 1) == 1
                assert [e.op for e in store.effects(job_id)] == [text]
    except impl.InvalidInput:
        pass
