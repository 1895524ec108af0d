"""The fuzzed workload's choices: both ways of entering a state stay in every run."""

from __future__ import annotations

import random

from impl.fuzz.workload import FIXED_NEXT, STEPS, WORKFLOW, step_then


def test_steps_with_a_known_next_state_enter_it_both_ways() -> None:
    """Half the steps whose next state is fixed enter it with their last effect's result
    (``then=``), the rest with an ``advance`` of their own; so the multi-process fuzz
    crashes both paths."""
    rng = random.Random(7)
    for state, target in FIXED_NEXT.items():
        chosen = [step_then(state, rng) for _ in range(200)]
        assert set(chosen) == {None, target}
        assert 60 <= chosen.count(None) <= 140
        assert (state, target) in WORKFLOW.transitions


def test_a_step_whose_next_state_depends_on_its_results_advances_apart() -> None:
    rng = random.Random(7)
    undecided = set(STEPS) - set(FIXED_NEXT)
    assert undecided == {"MERGED"}
    assert {step_then("MERGED", rng) for _ in range(50)} == {None}
