"""History logs: one line per entry, a kill tears at most the last line, damage elsewhere
is reported rather than skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from impl.fuzz.history import HistoryDamaged, HistoryWriter, read_histories, read_history
from tests.fuzz.conftest import child_env

WRITER = """
import sys
from pathlib import Path
from impl.fuzz.history import HistoryWriter
w = HistoryWriter(Path(sys.argv[1]), "w", lambda: 1.0)
i = 0
while True:
    w.write("tick", i=i, pad="x" * (i % 5000))
    i += 1
"""


def test_entries_round_trip_with_worker_and_clock(tmp_path: Path) -> None:
    w = HistoryWriter(tmp_path / "a.jsonl", "a", lambda: 42.0)
    w.write("lease", job="j", token=3)
    w.write("end", job="j", token=3, state="DONE")
    w.close()
    log = read_history(tmp_path / "a.jsonl")
    assert not log.torn
    assert [e["ev"] for e in log.entries] == ["lease", "end"]
    assert log.entries[0]["w"] == "a"
    assert log.entries[0]["t"] == 42.0
    assert log.entries[0]["pid"] == os.getpid()
    assert log.entries[0]["mono"] <= log.entries[1]["mono"]


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    w = HistoryWriter(path, "a", lambda: 0.0)
    w.write("lease", job="j", token=1)
    w.close()
    with path.open("ab") as f:
        f.write(b'{"ev":"exec","job":"j","tok')
    log = read_history(path)
    assert log.torn
    assert [e["ev"] for e in log.entries] == ["lease"]


def test_damage_before_the_last_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"ev":"lease"}\n{"ev":"ex\n{"ev":"end"}\n')
    with pytest.raises(HistoryDamaged, match="line 2"):
        read_history(path)


def test_threads_sharing_a_writer_never_interleave_lines(tmp_path: Path) -> None:
    w = HistoryWriter(tmp_path / "a.jsonl", "a", lambda: 0.0)

    def burst(n: int) -> None:
        for i in range(400):
            w.write("x", thread=n, i=i, pad="y" * 3000)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    w.close()
    log = read_history(tmp_path / "a.jsonl")
    assert len(log.entries) == 1600
    assert not log.torn


def test_sigkill_mid_stream_leaves_a_readable_log(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=child_env())
    try:
        deadline = time.monotonic() + 30
        while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    (log,) = read_histories(tmp_path)
    numbers = [e["i"] for e in log.entries]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) > 10
