"""The demo: worker processes SIGKILLed mid-stream, resumed, every file verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from impl.download.demo import run_demo

pytestmark = pytest.mark.xdist_group("processes")


def test_demo_survives_kills_and_verifies_every_file(tmp_path: Path) -> None:
    lines: list[str] = []
    report = run_demo(
        tmp_path / "demo", files=3, size=600_000, kills=2, rate=300_000, say=lines.append
    )
    assert report.ok
    assert report.verified == 3
    assert report.processes_killed >= 1
    assert report.ranged_requests >= 1
    assert report.bytes_resumed > 0
    assert report.duplicates_avoided == 2
    assert report.elapsed < 60
    assert lines[-1].startswith("done in")
