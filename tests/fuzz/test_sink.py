"""The fenced sink: rejects a token lower than the highest it accepted for the job, keeps
a record of every execution, and stays consistent when a writer is SIGKILLed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from impl.fuzz.sink import FencedSink, integrity_of
from tests.fuzz.conftest import child_env

HAMMER = """
import sys, random
from pathlib import Path
from impl.fuzz.sink import FencedSink
s = FencedSink(Path(sys.argv[1]))
rng = random.Random(7)
i = 0
while True:
    job = f"job{rng.randrange(5)}"
    s.execute(job_id=job, op="op", op_key=f"k{i}", token=rng.randrange(1, 50),
              exec_id=f"x#{i}", worker="h")
    i += 1
"""


def run(sink: FencedSink, job: str, token: int, exec_id: str) -> bool:
    return sink.execute(job_id=job, op="op", op_key="k", token=token, exec_id=exec_id, worker="w")


def test_lower_token_is_rejected_equal_and_higher_accepted(tmp_path: Path) -> None:
    sink = FencedSink(tmp_path / "sink.sqlite")
    try:
        assert run(sink, "j", 2, "a")
        assert run(sink, "j", 2, "b")
        assert not run(sink, "j", 1, "c")
        assert run(sink, "j", 3, "d")
        assert not run(sink, "j", 2, "e")
        assert run(sink, "other", 1, "f")
        seen = [(x.exec_id, x.token, x.accepted, x.high_before) for x in sink.executions()]
        assert seen == [
            ("a", 2, True, None),
            ("b", 2, True, 2),
            ("c", 1, False, 2),
            ("d", 3, True, 2),
            ("e", 2, False, 3),
            ("f", 1, True, None),
        ]
    finally:
        sink.close()


def test_unfenced_sink_accepts_stale_tokens(tmp_path: Path) -> None:
    """The broken sink the checker must catch: it takes whatever comes."""
    sink = FencedSink(tmp_path / "sink.sqlite", fenced=False)
    try:
        assert run(sink, "j", 3, "a")
        assert run(sink, "j", 1, "b")
    finally:
        sink.close()


def test_two_handles_share_the_fence(tmp_path: Path) -> None:
    one = FencedSink(tmp_path / "sink.sqlite")
    two = FencedSink(tmp_path / "sink.sqlite")
    try:
        assert run(one, "j", 5, "a")
        assert not run(two, "j", 4, "b")
    finally:
        one.close()
        two.close()


def test_sigkilled_writer_leaves_the_sink_consistent(tmp_path: Path) -> None:
    path = tmp_path / "sink.sqlite"
    FencedSink(path).close()
    proc = subprocess.Popen([sys.executable, "-c", HAMMER, str(path)], env=child_env())
    watcher = FencedSink(path)
    try:
        # Kill it mid-stream, once it has written plenty, however slowly it started.
        deadline = time.monotonic() + 60
        while len(watcher.executions()) < 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        watcher.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert integrity_of(path) == "ok"
    sink = FencedSink(path)
    try:
        executions = sink.executions()
        assert len(executions) >= 200
        high: dict[str, int] = {}
        for x in executions:
            top = high.get(x.job_id)
            assert x.high_before == top
            assert x.accepted == (top is None or x.token >= top)
            if x.accepted:
                high[x.job_id] = max(x.token, top or 0)
        assert run(sink, "job0", high.get("job0", 0), "after")
    finally:
        sink.close()


def test_integrity_of_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    assert integrity_of(bad) != "ok"
