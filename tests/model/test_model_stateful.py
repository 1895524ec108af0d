"""The reference model alone keeps every invariant of the contract over random steps,
including workers that die mid-effect and clocks that jump past the TTL.

The model is cheap, so it runs five times the profile's examples (300 under ``ci``,
about 15,000 steps; ``explore`` runs 25,000 examples)."""

from __future__ import annotations

from hypothesis import settings

from tests.stateful.machine import LedgerMachine

TestModelMachine = LedgerMachine.TestCase
TestModelMachine.settings = settings(
    settings.default, max_examples=settings.default.max_examples * 5, stateful_step_count=50
)
