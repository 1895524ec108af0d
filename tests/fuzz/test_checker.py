"""The checker catches every violation it names, and passes a clean real history.

Each test starts from a clean history produced by a real run (two workers, one lease
stolen mid-job; see ``conftest.build_clean_run``) and breaks one thing by hand, the way
a buggy store, a buggy sink or a buggy effect wrapper would, then asserts that the
checker names exactly that rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from impl.fuzz import checker as c
from impl.fuzz.checker import Evidence, Violation, check
from impl.fuzz.history import Entry
from model.record import EffectInfo, Event, HistoryEvent
from tests.fuzz.conftest import CleanRun


def rules(violations: Sequence[Violation]) -> set[str]:
    return {v.rule for v in violations}


def first_job(ev: Evidence) -> str:
    """The job whose lease was stolen: it has two grants."""
    for job_id, events in ev.history.items():
        if sum(h.event == Event.LEASED for h in events) == 2:
            return job_id
    raise AssertionError("the clean run has no stolen lease")


def with_history(ev: Evidence, job_id: str, events: Sequence[HistoryEvent]) -> Evidence:
    history = dict(ev.history)
    history[job_id] = list(events)
    return attrs.evolve(ev, history=history)


def entries_of(ev: Evidence, kind: str) -> list[Entry]:
    return [e for e in ev.entries if e.get("ev") == kind]


def test_clean_real_history_passes(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    assert len(ev.planned) == 4
    assert check(ev) == []


def test_stolen_lease_left_two_grants_in_the_clean_history(clean_run: CleanRun) -> None:
    job_id = first_job(clean_run.evidence)
    tokens = [h.token for h in clean_run.evidence.history[job_id] if h.event == Event.LEASED]
    assert tokens == [1, 2]


def test_missing_planned_job_is_lost(clean_run: CleanRun) -> None:
    ev = attrs.evolve(clean_run.evidence, planned=clean_run.evidence.planned | {"f" * 64})
    assert rules(check(ev)) == {c.LOST_JOB}


def test_non_terminal_job_after_drain_is_lost(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    job_id = first_job(ev)
    jobs = dict(ev.jobs)
    jobs[job_id] = attrs.evolve(jobs[job_id], state="SPLIT")
    found = check(attrs.evolve(ev, jobs=jobs))
    assert c.LOST_JOB in rules(found)
    assert any(v.rule == c.LOST_JOB and v.job_id == job_id for v in found)


def test_job_nobody_planned_is_unexpected(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    job_id = first_job(ev)
    found = check(attrs.evolve(ev, planned=ev.planned - {job_id}))
    assert rules(found) == {c.UNEXPECTED_JOB}


def test_replay_returning_another_result_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    entries = list(ev.entries)
    i = next(i for i, e in enumerate(entries) if e.get("ev") == "result")
    entries[i] = {**entries[i], "result": {"exec": "someone-else#9", "token": 1}}
    found = check(attrs.evolve(ev, entries=entries))
    assert rules(found) == {c.EFFECT_RESULT}
    assert "recorded result is" in str(found[0])


def test_result_returned_but_never_recorded_is_caught(clean_run: CleanRun) -> None:
    """A worker told "done" while the record did not survive: invariant 9 broken."""
    ev = clean_run.evidence
    job_id = first_job(ev)
    effects: dict[str, Sequence[EffectInfo]] = dict(ev.effects)
    effects[job_id] = [e for e in effects[job_id] if e.op != "merge"]
    found = check(attrs.evolve(ev, effects=effects))
    assert rules(found) == {c.EFFECT_RESULT}
    messages = " ".join(str(v) for v in found)
    assert "no result is recorded" in messages
    assert "without a recorded merge" in messages


def test_op_key_recorded_twice_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    job_id = first_job(ev)
    effects: dict[str, Sequence[EffectInfo]] = dict(ev.effects)
    effects[job_id] = [*effects[job_id], effects[job_id][0]]
    assert c.EFFECT_RESULT in rules(check(attrs.evolve(ev, effects=effects)))


def test_recorded_result_the_sink_never_accepted_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    job_id = first_job(ev)
    effects: dict[str, Sequence[EffectInfo]] = dict(ev.effects)
    first = effects[job_id][0]
    forged = attrs.evolve(first, result={"exec": "ghost#0", "token": first.token})
    effects[job_id] = [forged, *effects[job_id][1:]]
    found = check(attrs.evolve(ev, effects=effects))
    assert c.EFFECT_RESULT in rules(found)
    assert any("not an execution the sink accepted" in str(v) for v in found)


def _extra_execution(ev: Evidence, **changes: object) -> Evidence:
    last = ev.executions[-1]
    extra = attrs.evolve(last, seq=last.seq + 1, exec_id="extra#0", **changes)  # type: ignore[arg-type]
    return attrs.evolve(ev, executions=[*ev.executions, extra])


def test_sink_accepting_a_stale_token_is_caught(clean_run: CleanRun) -> None:
    """What a sink without fencing does when a zombie writes after its successor."""
    ev = clean_run.evidence
    job_id = first_job(ev)
    mine = [x for x in ev.executions if x.job_id == job_id]
    stale = attrs.evolve(mine[0], seq=ev.executions[-1].seq + 1, exec_id="a#99", token=1)
    found = check(attrs.evolve(ev, executions=[*ev.executions, stale]))
    assert c.STALE_EXECUTION in rules(found)
    assert any("after token 2" in str(v) for v in found if v.rule == c.STALE_EXECUTION)


def test_sink_rejecting_the_current_token_is_caught(clean_run: CleanRun) -> None:
    ev = _extra_execution(clean_run.evidence, accepted=False)
    assert c.SINK_FENCING in rules(check(ev))


def test_execution_without_a_ledger_start_is_caught(clean_run: CleanRun) -> None:
    """An effect wrapper that runs fn outside run_effect (ignoring LeaseLost)."""
    ev = _extra_execution(clean_run.evidence)
    found = check(ev)
    assert c.UNFENCED_EXECUTION in rules(found)
    assert any("start(s) under that token" in str(v) for v in found)


def test_execution_under_a_token_granted_to_another_worker_is_caught(
    clean_run: CleanRun,
) -> None:
    """An effect wrapper that passes a token other than its own lease's."""
    ev = clean_run.evidence
    target = next(x for x in ev.executions if x.worker == "b")
    executions = [
        attrs.evolve(x, worker="a") if x.exec_id == target.exec_id else x for x in ev.executions
    ]
    found = check(attrs.evolve(ev, executions=executions))
    assert c.UNFENCED_EXECUTION in rules(found)
    assert any("which was granted to b" in str(v) for v in found)


def test_move_along_an_undeclared_edge_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    job_id = first_job(ev)
    events = list(ev.history[job_id])
    i = next(i for i, h in enumerate(events) if h.event == Event.ADVANCED)
    events[i : i + 1] = [attrs.evolve(events[i], detail={"from": "NEW", "to": "SPLIT"})]
    found = check(with_history(ev, job_id, events))
    assert c.ILLEGAL_STATES in rules(found)
    assert any("NEW->SPLIT is not a declared edge" in str(v) for v in found)


def test_repeated_state_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    job_id = first_job(ev)
    events = list(ev.history[job_id])
    i = next(i for i, h in enumerate(events) if h.event == Event.ADVANCED)
    events.insert(i + 1, attrs.evolve(events[i], detail={"from": "FETCHED", "to": "NEW"}))
    found = check(with_history(ev, job_id, events))
    assert c.ILLEGAL_STATES in rules(found)


def test_two_workers_told_they_made_the_same_move_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    move = next(e for e in ev.entries if e.get("ev") == "advance" and e.get("moved") is True)
    twin = {**move, "w": "a"}
    found = check(attrs.evolve(ev, entries=[*ev.entries, twin]))
    assert c.ILLEGAL_STATES in rules(found)
    assert any("both b and a were told" in str(v) for v in found)


def test_tokens_granted_out_of_order_are_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    job_id = first_job(ev)
    events = [
        attrs.evolve(h, token=1) if h.event == Event.LEASED and h.token == 2 else h
        for h in ev.history[job_id]
    ]
    found = check(with_history(ev, job_id, events))
    assert c.TOKEN_ORDER in rules(found)
    assert any("granted token 1 after token 1" in str(v) for v in found)


def test_write_under_a_superseded_token_is_caught(clean_run: CleanRun) -> None:
    """What a store without its fencing check leaves in the history."""
    ev = clean_run.evidence
    job_id = first_job(ev)
    events = list(ev.history[job_id])
    last_move = max(i for i, h in enumerate(events) if h.event == Event.ADVANCED)
    events[last_move] = attrs.evolve(events[last_move], token=1, worker="a")
    found = check(with_history(ev, job_id, events))
    assert c.TOKEN_ORDER in rules(found)
    assert any("under token 1 while the current token was 2" in str(v) for v in found)


def test_one_token_held_by_two_workers_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    lease = next(e for e in ev.entries if e.get("ev") == "lease" and e.get("w") == "b")
    found = check(attrs.evolve(ev, entries=[*ev.entries, {**lease, "w": "a"}]))
    assert c.TOKEN_ORDER in rules(found)
    assert any("held by both b and a" in str(v) for v in found)


def test_job_finishing_after_the_liveness_bound_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    start = min(h.at for hs in ev.history.values() for h in hs)
    late = attrs.evolve(ev, drain_started_at=start - 100.0, step=1.0, liveness_steps=50)
    found = check(late)
    assert rules(found) == {c.LIVENESS}
    assert len(found) == len(ev.jobs)
    assert check(attrs.evolve(late, liveness_steps=10_000)) == []


def test_worker_outcome_the_sink_does_not_show_is_caught(clean_run: CleanRun) -> None:
    ev = clean_run.evidence
    entries = [
        {**e, "ok": False} if e.get("ev") == "sink" and e.get("exec") == "a#0" else e
        for e in ev.entries
    ]
    found = check(attrs.evolve(ev, entries=entries))
    assert rules(found) == {c.SINK_MISMATCH}


def test_damaged_database_and_worker_errors_are_reported(clean_run: CleanRun) -> None:
    ev = attrs.evolve(
        clean_run.evidence,
        integrity={"ledger": "*** in database main *** Page 3 is never used"},
        worker_errors=["worker w0001 exited with 1: Traceback ..."],
    )
    assert rules(check(ev)) == {c.INTEGRITY, c.WORKER_ERROR}


@pytest.mark.parametrize("rule", c.RULES)
def test_every_rule_has_a_test_here(rule: str) -> None:
    """A rule without a test that breaks it is a rule nobody knows the checker enforces."""
    source = Path(__file__).read_text(encoding="utf-8")
    constant = next(name for name in dir(c) if getattr(c, name) == rule and name.isupper())
    assert f"c.{constant}" in source


def test_summary_counts_per_rule() -> None:
    found = [Violation(c.LOST_JOB, "x", "m"), Violation(c.LOST_JOB, "y", "m")]
    assert c.summarize(found) == {c.LOST_JOB: 2}
