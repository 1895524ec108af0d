"""The reference model alone keeps every invariant of the contract over random steps,
including workers that die mid-effect and clocks that jump past the TTL."""

from __future__ import annotations

from tests.stateful.machine import LedgerMachine

TestModelMachine = LedgerMachine.TestCase
