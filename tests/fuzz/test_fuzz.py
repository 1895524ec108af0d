"""The multi-process crash fuzz: real workers, SIGKILLs, a jumping clock, a history check.

The default run spends about two minutes in the ``fuzz`` xdist group (one xdist worker
runs it, so its worker processes do not compete with another subprocess-heavy test);
``JOBLEDGER_FUZZ_SECONDS`` makes the chaos phase longer and ``JOBLEDGER_FUZZ_SEED``
replays a seed's decisions. Every run prints its figures; a failing run keeps its
folder (database, histories, sink) and prints the command that reruns the seed.

The broken-build tests plant a bug in the worker processes (see ``broken_child``) and
assert that the checker reports it: the proof that a green run means something.
``JOBLEDGER_FUZZ_BROKEN=1`` also runs the timing-dependent broken builds.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from impl import selftest
from impl.fuzz import checker as c
from impl.fuzz.engine import FuzzResult, FuzzSettings, run_fuzz
from impl.selftest import SelftestReport

SECONDS_DEFAULT = 95.0
MIN_KILLS = 100
ZOMBIE_HEAVY: dict[str, float] = {
    "seconds": 15.0,
    "workers": 4,
    "backlog": 2,
    "jump_rate": 0.1,
    "pause": 0.3,
}
"""Settings under which a worker whose lease expired often reaches the sink late."""


def _seed() -> int:
    text = os.environ.get("JOBLEDGER_FUZZ_SEED")
    return int(text) if text else random.SystemRandom().randrange(2**32)


def _rerun(seed: int, seconds: float, test: str) -> str:
    return (
        f"JOBLEDGER_FUZZ_SEED={seed} JOBLEDGER_FUZZ_SECONDS={seconds:g} "
        f"python -m pytest -p no:cacheprovider 'tests/fuzz/test_fuzz.py::{test}'"
    )


def _report(result: FuzzResult, rerun: str) -> str:
    return SelftestReport(result, rerun).render(max_violations=40)


SECONDS = float(os.environ.get("JOBLEDGER_FUZZ_SECONDS", SECONDS_DEFAULT))


@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(2 * SECONDS + 600)
def test_crash_fuzz_history_is_clean(tmp_path: Path) -> None:
    seconds = SECONDS
    seed = _seed()
    result = run_fuzz(
        tmp_path,
        FuzzSettings(seconds=seconds, seed=seed, min_kills=MIN_KILLS, max_seconds=seconds + 60),
    )
    text = _report(result, _rerun(seed, seconds, "test_crash_fuzz_history_is_clean"))
    print(text)
    assert result.ok, text
    assert result.kills >= MIN_KILLS, text
    assert result.jobs > 0, text
    assert sum(result.by_state.values()) == result.jobs, text


GROUPED_SECONDS = 20.0
GROUPED_MIN_KILLS = 20
LEDGER_SECONDS = 20.0


def _threaded_fuzz(tmp_path: Path, test: str, seconds: float, **settings: object) -> None:
    """Three worker processes of four threads each, SIGKILLed at random and at every
    failpoint, with ``settings`` choosing how the threads reach the ledger; the history
    check and the drain's reconcile must find nothing wrong."""
    seed = _seed()
    result = run_fuzz(
        tmp_path,
        FuzzSettings(
            seconds=seconds,
            seed=seed,
            workers=3,
            concurrency=4,
            backlog=24,
            min_kills=GROUPED_MIN_KILLS,
            max_seconds=seconds * 3,
            **settings,  # type: ignore[arg-type]
        ),
    )
    text = _report(result, _rerun(seed, seconds, test))
    print(text)
    assert result.ok, text
    assert result.kills >= GROUPED_MIN_KILLS, text
    assert result.jobs > 0, text


@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(GROUPED_SECONDS * 2 + 400)
def test_grouped_commit_crash_fuzz_history_is_clean(tmp_path: Path) -> None:
    """The threads' writes share group transactions (impl.sqlite.group), the group's own
    failpoints included (a kill before the group's COMMIT loses every member's write, one
    after it keeps them all)."""
    _threaded_fuzz(
        tmp_path,
        "test_grouped_commit_crash_fuzz_history_is_clean",
        GROUPED_SECONDS,
        group_window=0.005,
    )


@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(LEDGER_SECONDS * 2 + 400)
def test_ledger_thread_crash_fuzz_history_is_clean(tmp_path: Path) -> None:
    """The threads' ledger calls are made on a ledger thread (``Worker(ledger_threads=1)``,
    impl.ledgerthread, the default of a threaded worker on SQLite), its own failpoints
    included (a kill before its call leaves nothing of it, one after leaves all of it with
    the caller never told)."""
    _threaded_fuzz(
        tmp_path,
        "test_ledger_thread_crash_fuzz_history_is_clean",
        LEDGER_SECONDS,
        ledger_threads=1,
    )


@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_zombie_heavy_run_is_clean(tmp_path: Path) -> None:
    """Long effects, frequent TTL jumps and idle workers: many zombies racing their
    successors to the sink. The correct build must stay clean under it (the same settings
    catch a sink without fencing, see below)."""
    seed = _seed()
    result = run_fuzz(tmp_path, FuzzSettings(seed=seed, **ZOMBIE_HEAVY))
    text = _report(result, _rerun(seed, 15.0, "test_zombie_heavy_run_is_clean"))
    print(text)
    assert result.ok, text


@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_selftest_short_run_reports_figures_and_cleans_up(tmp_path: Path) -> None:
    """The function ``jobledger selftest`` calls: a passing run leaves nothing behind."""
    report = selftest.run(tmp_path, seconds=4.0, seed=7, workers=2)
    text = report.render()
    print(text)
    assert report.ok, text
    data = report.as_dict()
    assert data["seed"] == 7
    assert data["violations"] == []
    assert data["kept"] is None
    assert data["jobs"] == sum(report.result.by_state.values())
    assert "seed 7" in text
    assert "violations    0" in text
    assert list(tmp_path.iterdir()) == []
    assert report.rerun == f"jobledger selftest --dir {tmp_path} --seconds 4 --seed 7 --workers 2"


def _broken(tmp_path: Path, mode: str, **changes: object) -> FuzzResult:
    seed = _seed()
    changes.setdefault("seconds", 8.0)
    changes.setdefault("workers", 3)
    settings = FuzzSettings(
        seed=seed,
        child_module="tests.fuzz.broken_child",
        child_env={"FUZZ_BROKEN": mode},
        **changes,  # type: ignore[arg-type]
    )
    result = run_fuzz(tmp_path, settings)
    print(_report(result, f"(broken build {mode}, seed {seed})"))
    return result


@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_checker_catches_an_effect_passing_a_stale_token(tmp_path: Path) -> None:
    result = _broken(tmp_path, "stale-token")
    assert not result.ok
    assert {v.rule for v in result.violations} >= {c.UNFENCED_EXECUTION, c.EFFECT_RESULT}
    assert result.folder is not None
    assert (result.folder / "ledger.sqlite").exists()


broken_opt_in = pytest.mark.skipif(
    not os.environ.get("JOBLEDGER_FUZZ_BROKEN"),
    reason="timing-dependent broken builds run with JOBLEDGER_FUZZ_BROKEN=1",
)


@broken_opt_in
@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_checker_catches_a_store_without_fencing(tmp_path: Path) -> None:
    result = _broken(tmp_path, "no-store-fencing", jump_rate=0.05, pause=0.05)
    assert not result.ok
    assert {v.rule for v in result.violations} & {
        c.UNFENCED_EXECUTION,
        c.ILLEGAL_STATES,
        c.TOKEN_ORDER,
        c.EFFECT_RESULT,
    }


@broken_opt_in
@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_checker_catches_an_effect_run_after_lease_lost(tmp_path: Path) -> None:
    result = _broken(tmp_path, "ignore-lease-lost", jump_rate=0.05, pause=0.05)
    assert not result.ok
    assert c.UNFENCED_EXECUTION in {v.rule for v in result.violations}


@broken_opt_in
@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_checker_catches_a_sink_without_fencing(tmp_path: Path) -> None:
    # A zombie must reach the sink after its successor did: long effects, a clock that
    # jumps past the TTL, and idle workers ready to take an expired job make that common.
    result = _broken(tmp_path, "unfenced-sink", **ZOMBIE_HEAVY)
    assert not result.ok
    assert c.STALE_EXECUTION in {v.rule for v in result.violations}


@pytest.mark.xdist_group("fuzz")
@pytest.mark.timeout(300)
def test_pruning_while_workers_run_keeps_the_history_clean(tmp_path: Path) -> None:
    """The parent prunes finished jobs every fraction of a second while the workers run
    (and die). The jobs that remain, and the pruned ones read back from the archive,
    pass every check: a prune neither loses, duplicates nor damages a job."""
    seconds = min(SECONDS, 20.0)
    seed = _seed()
    result = run_fuzz(
        tmp_path,
        FuzzSettings(
            seconds=seconds, seed=seed, prune_every=(0.2, 0.6), prune_age=2.0, prune_batch=3
        ),
    )
    text = _report(
        result, _rerun(seed, seconds, "test_pruning_while_workers_run_keeps_the_history_clean")
    )
    print(text)
    assert result.ok, text
    assert result.prunes > 0, text
    assert result.pruned > 0, text
    assert result.kills > 0, text
