"""The shared clock: only the parent writes, readers in other processes never see a torn
or backwards value and cannot block the writer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from impl.fuzz.clock import START_DEFAULT, ClockReader, SharedClock
from tests.fuzz.conftest import child_env

READER = """
import sys
from pathlib import Path
from impl.fuzz.clock import ClockReader
r = ClockReader(Path(sys.argv[1]))
print(r(), flush=True)
values = [r() for _ in range(200_000)]
print(" ".join(repr(v) for v in values[::97]))
print(values[-1])
"""


def test_reader_sees_what_the_writer_published(tmp_path: Path) -> None:
    clock = SharedClock(tmp_path / "clock.bin")
    reader = ClockReader(tmp_path / "clock.bin")
    try:
        assert reader() == clock() == START_DEFAULT
        clock.advance(2.5)
        assert reader() == START_DEFAULT + 2.5
        assert clock.now == START_DEFAULT + 2.5
    finally:
        reader.close()
        clock.close()


def test_clock_never_moves_backwards(tmp_path: Path) -> None:
    clock = SharedClock(tmp_path / "clock.bin")
    try:
        with pytest.raises(ValueError, match="only moves forward"):
            clock.advance(-1.0)
        assert clock.now == START_DEFAULT
    finally:
        clock.close()


def test_reader_in_another_process_never_sees_a_torn_or_backwards_value(
    tmp_path: Path,
) -> None:
    """Every value a reader returns is one the writer published (a multiple of the step),
    in order, while the writer is publishing as fast as it can."""
    path = tmp_path / "clock.bin"
    clock = SharedClock(path, start=0.0)
    proc = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        first = float(proc.stdout.readline())
        assert first == 0.0
        while proc.poll() is None:
            clock.advance(0.125)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        clock.close()
    sampled = [float(v) for v in out.split("\n")[0].split()]
    assert sampled == sorted(sampled)
    assert all((v / 0.125).is_integer() for v in sampled)
    assert sampled[-1] > 0.0
