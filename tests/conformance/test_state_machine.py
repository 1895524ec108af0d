"""Workflows and ``advance``: states follow declared edges, never repeat, never go back.

Replaying an ``advance`` to the current state or to a state the job has passed is safe
(returns False, changes nothing), which is what lets a handler re-run after a crash.
"""

from __future__ import annotations

import pytest

import impl
from model import Event, ManualClock, Store, Workflow

from .flows import BRANCH, LINEAR, StoreFactory, plan_and_lease, setup, snapshot


def test_advance_follows_edges_and_records_them(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    clock.advance(3)
    assert store.advance(lease, "A") is True
    assert store.state(lease.job_id) == "A"
    job = store.job(lease.job_id)
    assert (job.updated_at, job.token, job.lease is not None) == (clock(), 1, True)
    assert store.advance(lease, "B") is True
    moves = [
        (e.event, dict(e.detail), e.token, e.worker)
        for e in store.history(lease.job_id)
        if e.event == Event.ADVANCED
    ]
    assert moves == [
        (Event.ADVANCED, {"from": "NEW", "to": "A"}, 1, "w1"),
        (Event.ADVANCED, {"from": "A", "to": "B"}, 1, "w1"),
    ]


@pytest.mark.parametrize("target", ["B", "A", "NEW"])
def test_replay_to_current_or_passed_state_returns_false(store: Store, target: str) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.advance(lease, "A")
    store.advance(lease, "B")
    before = snapshot(store, lease.job_id)
    assert store.advance(lease, target) is False
    assert snapshot(store, lease.job_id) == before


def test_replay_to_an_ancestor_on_another_branch_returns_false(store: Store) -> None:
    """RESUME_OK leads to STREAMING, so a job at STREAMING has passed it by definition."""
    lease = plan_and_lease(store, {"url": "u"}, kind="download")
    store.advance(lease, "HEAD_DONE")
    store.advance(lease, "STREAMING")
    before = snapshot(store, lease.job_id)
    assert store.advance(lease, "RESUME_OK") is False
    assert snapshot(store, lease.job_id) == before


@pytest.mark.parametrize(
    ("path", "target"),
    [
        pytest.param([], "LEFT", id="skip-ahead"),
        pytest.param(["MID"], "MID2", id="unknown-from-middle"),
        pytest.param([], "NOPE", id="unknown-state"),
        pytest.param(["MID"], "SKIPPED", id="sideways"),
        pytest.param([], "FAILED", id="failed-from-initial"),
        pytest.param(["MID"], "FAILED", id="failed-from-middle"),
    ],
)
def test_illegal_moves_raise_and_change_nothing(store: Store, path: list[str], target: str) -> None:
    setup(store, BRANCH)
    lease = plan_and_lease(store, kind="branch")
    for state in path:
        store.advance(lease, state)
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.IllegalTransition) as info:
        store.advance(lease, target)
    assert isinstance(info.value, ValueError)
    assert target in str(info.value)
    assert snapshot(store, lease.job_id) == before


def test_entering_a_terminal_state_ends_the_lease(store: Store) -> None:
    setup(store, BRANCH)
    lease = plan_and_lease(store, kind="branch")
    assert store.advance(lease, "SKIPPED") is True
    job = store.job(lease.job_id)
    assert (job.state, job.lease, job.lease_worker, job.token, job.attempts) == (
        "SKIPPED",
        None,
        None,
        1,
        1,
    )
    assert store.lease_next("w2") is None
    before = snapshot(store, lease.job_id)
    with pytest.raises(impl.LeaseLost):
        store.advance(lease, "SKIPPED")
    with pytest.raises(impl.LeaseLost):
        store.renew(lease)
    assert snapshot(store, lease.job_id) == before
    assert store.leases() == []


def test_state_survives_a_new_lease(store: Store, clock: ManualClock) -> None:
    setup(store)
    lease = plan_and_lease(store)
    store.advance(lease, "A")
    store.release(lease)
    again = store.lease_next("w2")
    assert again is not None
    assert again.state == "A"
    assert store.advance(again, "NEW") is False
    assert store.advance(again, "B") is True


# -- workflow definitions (pure: the Workflow constructor validates the graph) -------------


def _wf(**changes: object) -> Workflow:
    spec: dict[str, object] = {
        "name": "w",
        "states": ["NEW", "A", "DONE"],
        "transitions": [("NEW", "A"), ("A", "DONE")],
        "initial": "NEW",
        "terminal": ["DONE"],
    }
    spec.update(changes)
    return Workflow(**spec)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        pytest.param(
            {
                "transitions": [("NEW", "A"), ("A", "B2"), ("B2", "A"), ("A", "DONE")],
                "states": ["NEW", "A", "B2", "DONE"],
            },
            ["A", "B2"],
            id="cycle",
        ),
        pytest.param(
            {"transitions": [("NEW", "A"), ("A", "GHOST")]}, ["GHOST"], id="unknown-edge-end"
        ),
        pytest.param({"transitions": [("NEW", "NEW")]}, ["NEW"], id="self-loop"),
        pytest.param(
            {"transitions": [("NEW", "A"), ("A", "DONE"), ("DONE", "A")]},
            ["DONE", "A"],
            id="out-of-terminal",
        ),
        pytest.param(
            {"transitions": [("NEW", "A"), ("FAILED", "A")]}, ["FAILED"], id="out-of-failed"
        ),
        pytest.param({"initial": "DONE"}, ["DONE"], id="terminal-initial"),
        pytest.param({"initial": "ELSEWHERE"}, ["ELSEWHERE"], id="unknown-initial"),
        pytest.param({"terminal": ["DONE", "LIMBO"]}, ["LIMBO"], id="unknown-terminal"),
        pytest.param({"states": ["NEW", "A", "A", "DONE"]}, ["A"], id="duplicate-state"),
    ],
)
def test_invalid_workflows_are_refused_naming_the_culprit(
    changes: dict[str, object], named: list[str]
) -> None:
    with pytest.raises(impl.InvalidWorkflow) as info:
        _wf(**changes)
    assert isinstance(info.value, ValueError)
    for name in named:
        assert name in str(info.value)


def test_failed_state_is_added_and_terminal() -> None:
    wf = _wf()
    assert wf.states == ("NEW", "A", "DONE", "FAILED")
    assert wf.terminal == frozenset({"DONE", "FAILED"})
    assert _wf(failed="BROKEN").terminal == frozenset({"DONE", "BROKEN"})


def test_definitions_compare_without_order() -> None:
    assert _wf() == _wf(states=["DONE", "A", "NEW"], transitions={"A": ["DONE"], "NEW": ["A"]})
    assert _wf() != _wf(transitions=[("NEW", "A"), ("A", "DONE"), ("NEW", "DONE")])


# -- registration ---------------------------------------------------------------------------


def test_register_is_idempotent(store: Store) -> None:
    store.register(LINEAR)
    store.register(LINEAR)
    store.register(
        Workflow(
            name="linear",
            states=["DONE", "B", "A", "NEW", "FAILED"],
            transitions={"B": ["DONE"], "NEW": ["A"], "A": ["B"]},
            initial="NEW",
            terminal=["FAILED", "DONE"],
        )
    )
    assert store.workflow("linear") == LINEAR


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(
            {"transitions": [("NEW", "A"), ("A", "B"), ("B", "DONE"), ("NEW", "B")]},
            id="extra-edge",
        ),
        pytest.param({"states": ["NEW", "A", "B", "DONE", "X"]}, id="extra-state"),
        pytest.param({"initial": "A"}, id="other-initial"),
        pytest.param(
            {"terminal": ["DONE", "B"], "transitions": [("NEW", "A"), ("A", "B")]},
            id="other-terminal",
        ),
        pytest.param({"failed": "BROKEN"}, id="other-failed"),
    ],
)
def test_conflicting_definition_raises_and_keeps_the_first(
    store: Store, other: dict[str, object]
) -> None:
    store.register(LINEAR)
    spec: dict[str, object] = {
        "name": "linear",
        "states": ["NEW", "A", "B", "DONE"],
        "transitions": [("NEW", "A"), ("A", "B"), ("B", "DONE")],
        "initial": "NEW",
        "terminal": ["DONE"],
    }
    spec.update(other)
    with pytest.raises(impl.WorkflowConflict) as info:
        store.register(Workflow(**spec))  # type: ignore[arg-type]
    assert "linear" in str(info.value)
    assert store.workflow("linear") == LINEAR


def test_download_is_always_registered(store: Store) -> None:
    assert store.workflow("download") == impl.DOWNLOAD
    store.register(impl.DOWNLOAD)
    assert [w.name for w in store.workflows()] == ["download"]


def test_workflows_are_listed_by_name_and_unknown_ones_raise(store: Store) -> None:
    store.register(LINEAR)
    store.register(BRANCH)
    assert [w.name for w in store.workflows()] == ["branch", "download", "linear"]
    with pytest.raises(impl.UnknownWorkflow) as info:
        store.workflow("nope")
    assert isinstance(info.value, LookupError)


def test_definitions_survive_reopening(store_factory: StoreFactory) -> None:
    first = store_factory()
    first.register(LINEAR)
    first.register(BRANCH)
    job_id = first.plan("branch", {"n": 1})
    second = store_factory()
    assert second.workflow("linear") == LINEAR
    assert second.workflow("branch") == BRANCH
    assert second.workflow("linear").states == LINEAR.states
    second.register(LINEAR)
    with pytest.raises(impl.WorkflowConflict):
        second.register(Workflow("linear", ["NEW", "DONE"], [("NEW", "DONE")], "NEW", ["DONE"]))
    lease = second.lease_next("w1")
    assert lease is not None
    assert lease.job_id == job_id
    assert second.advance(lease, "MID") is True
    with pytest.raises(impl.IllegalTransition):
        second.advance(lease, "SKIPPED")
