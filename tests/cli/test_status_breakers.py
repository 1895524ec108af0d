"""``jobledger status`` shows the circuit breakers download runs recorded; ``prune``
removes old rows.

The rows are written through the Store API on a clock set in the past, as earlier runs
would have left them; the command reads them on the wall clock.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from impl import open_store
from model import ManualClock
from model.breaker import BREAKER_RECENT_SECONDS, BREAKER_STALE_SECONDS
from tests.cli.conftest import Outcome


def _ledger(path: Path) -> float:
    """Write breaker rows as four runs left them; return the wall time it was written at."""
    now = time.time()
    clock = ManualClock(now - BREAKER_RECENT_SECONDS - 400)
    with open_store(path, clock=clock) as store:
        # Closed long ago: no longer shown.
        store.record_breaker("old:80", worker="m1:1:0", state="open", failures=3, cooldown=30.0)
        clock.advance(30)
        store.record_breaker("old:80", worker="m1:1:0", state="closed", failures=0)
        # Open, and its probe was due ten minutes ago: its process stopped asking.
        clock.advance(now - 630 - clock())
        store.record_breaker(
            "down:8080", worker="m1:2:0", state="open", failures=5,
            last_error="ConnectError: [Errno 111] Connection refused", cooldown=30.0,
        )  # fmt: skip
        # Closed two minutes ago, after being open.
        clock.advance(now - 150 - clock())
        store.record_breaker(
            "back:80", worker="m2:3:0", state="open", failures=3, last_error="HTTP 503",
            cooldown=30.0,
        )  # fmt: skip
        clock.advance(now - 120 - clock())
        store.record_breaker("back:80", worker="m2:3:0", state="closed", failures=0)
        # Open now, its probe due in about 20 s; a second process has its own row.
        clock.advance(now - 10 - clock())
        store.record_breaker("down:8080", worker="m2:3:0", state="open", failures=3, cooldown=30.0)
    return now


def test_status_lists_open_stale_and_recently_closed_breakers(
    run: Callable[..., Outcome], tmp_path: Path
) -> None:
    path = tmp_path / "l.sqlite"
    now = _ledger(path)
    out = run("--db", str(path), "status")
    assert out.code == 0, out.err
    assert "circuit breakers (each process's own; closed ones for 1 h 0 min):" in out.out
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.out.splitlines()
             if ":" in line.split()[0] and len(line.split()) > 2}  # fmt: skip
    assert "old:80 m1:1:0" not in lines
    stale = lines["down:8080 m1:2:0"]
    assert "open (stale)" in stale
    assert re.search(r"probe was due 10 min \d+ s ago; its process stopped asking", stale)
    assert "ConnectError: [Errno 111] Connection refused" in stale
    # Its probe is due 20 s after the ledger was written, less the time the command took
    # to start (often under the 0.05 s the duration rounds away).
    due = re.search(r"probe in (\d+\.\d) s", lines["down:8080 m2:3:0"])
    assert due is not None, lines["down:8080 m2:3:0"]
    assert 10.0 < float(due.group(1)) <= 20.0
    back = lines["back:80 m2:3:0"]
    assert " closed " in back
    assert re.search(r"closed 2 min \d+ s ago", back)
    assert "HTTP 503" in back  # why it was open, kept after it closed

    data = json.loads(run("--db", str(path), "status", "--json").out)
    rows = {(b["host"], b["worker"]): b for b in data["breakers"]}
    assert sorted(rows) == [
        ("back:80", "m2:3:0"),
        ("down:8080", "m1:2:0"),
        ("down:8080", "m2:3:0"),
    ]
    down = rows["down:8080", "m1:2:0"]
    assert (down["state"], down["failures"], down["opens"], down["stale"]) == ("open", 5, 1, True)
    assert abs(down["until"] - (now - 600)) < 1e-6
    assert now - down["until"] > BREAKER_STALE_SECONDS
    assert rows["down:8080", "m2:3:0"]["stale"] is False
    back_row = rows["back:80", "m2:3:0"]
    assert (back_row["state"], back_row["until"], back_row["last_error"]) == (
        "closed",
        None,
        "HTTP 503",
    )
    assert abs(back_row["opened_at"] - (now - 150)) < 1e-6


def test_status_without_breakers_prints_no_section(
    run: Callable[..., Outcome], tmp_path: Path
) -> None:
    path = tmp_path / "l.sqlite"
    assert run("--db", str(path), "migrate").code == 0
    out = run("--db", str(path), "status")
    assert out.code == 0, out.err
    assert "breaker" not in out.out
    assert json.loads(run("--db", str(path), "status", "--json").out)["breakers"] == []


def test_prune_removes_breaker_rows_changed_before_its_cutoff(
    run: Callable[..., Outcome], tmp_path: Path
) -> None:
    path = tmp_path / "l.sqlite"
    _ledger(path)
    db = ["--db", str(path)]
    dry = json.loads(run(*db, "prune", "--finished-before", "5m", "--dry-run", "--json").out)
    assert dry["breakers_forgotten"] == 2  # old:80 and the stale down:8080
    with open_store(path) as store:
        assert len(store.breakers()) == 4
    out = run(*db, "prune", "--finished-before", "5m")
    assert out.code == 0, out.err
    assert "; pruned 2 circuit breaker row(s)" in out.out
    with open_store(path) as store:
        assert [(r.host, r.worker) for r in store.breakers()] == [
            ("back:80", "m2:3:0"),
            ("down:8080", "m2:3:0"),
        ]
