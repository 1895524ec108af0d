"""The pacer of long maintenance steps (impl/pacing.py): sizes and pauses, by its own
clock (the test moves it; no wall-clock bound)."""

from __future__ import annotations

import pytest

from impl.pacing import AIM, LONGEST_PAUSE, Pacer


class _Time:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def _step(pacer: Pacer, time_: _Time, items: int, seconds: float) -> None:
    started = pacer.start()
    time_.now += seconds
    pacer.done(started, items)


def test_a_step_over_the_budget_makes_the_next_one_fit_it() -> None:
    time_ = _Time()
    pacer = Pacer(limit=1024, budget=0.02, first=64, monotonic=time_.monotonic, sleep=time_.sleep)
    assert pacer.size == 64
    _step(pacer, time_, 64, 0.064)  # 1 ms an item: 64 ms, over the 20 ms budget
    assert pacer.size == int(0.02 * AIM / 0.001)
    _step(pacer, time_, pacer.size, pacer.size * 0.001)
    assert pacer.steps[-1].seconds <= pacer.budget


def test_cheap_steps_grow_at_most_twofold_up_to_the_limit() -> None:
    time_ = _Time()
    pacer = Pacer(limit=200, budget=0.02, first=8, monotonic=time_.monotonic, sleep=time_.sleep)
    sizes = []
    for _ in range(7):
        sizes.append(pacer.size)
        _step(pacer, time_, pacer.size, 1e-6)
    assert sizes == [8, 16, 32, 64, 128, 200, 200]


def test_a_floor_keeps_every_step_at_its_size() -> None:
    time_ = _Time()
    pacer = Pacer(limit=50, floor=50, monotonic=time_.monotonic, sleep=time_.sleep)
    _step(pacer, time_, 50, 10.0)
    assert pacer.size == 50


def test_each_step_is_followed_by_a_pause_that_keeps_the_share() -> None:
    time_ = _Time()
    pacer = Pacer(limit=10, share=0.25, monotonic=time_.monotonic, sleep=time_.sleep)
    _step(pacer, time_, 10, 0.01)
    _step(pacer, time_, 10, 10.0)
    assert time_.slept == pytest.approx([0.03, LONGEST_PAUSE])
