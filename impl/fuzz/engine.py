"""The fuzz parent: owns the clock, plans jobs, kills and respawns workers, drains, checks.

A run has two phases. *Chaos*: worker processes run the fuzz workflow while the parent
moves the shared clock in small steps (and now and then past the lease TTL, so leases
expire under their holders), SIGKILLs workers at random times and arms ``N*kill``
failpoints in the environment of others, and respawns every dead worker under a new
name. *Drain*: no more kills or failpoints; the parent reconciles, moves the clock past
every TTL and keeps stepping it until every job is terminal or the liveness bound is
spent. Then it stops the workers, reads the ledger (through the Store API, whichever the
backend), the histories and the sink, and hands them to the checker. Every decision
comes from one seeded random source; the operating system's scheduling does not, so a
seed replays the schedule, not the timing.

The ledger is a SQLite file in the run's folder, or a fresh schema on a PostgreSQL server
(see :mod:`impl.fuzz.ledger`); the sink, the clock and the histories stay in the folder
either way. On PostgreSQL the chaos also cuts a random worker's sessions from the server
side (``pg_terminate_backend``) now and then; the worker must live through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from random import Random
from typing import IO

import attrs
from attrs import define, field, frozen

import impl
from impl.failpoint import ALL, ENV_VAR, GROUP_POINTS, LEDGER_THREAD_POINTS, WRITERS_POINTS
from impl.fuzz.checker import Evidence, Violation, check
from impl.fuzz.child import ChildSpec
from impl.fuzz.clock import SharedClock
from impl.fuzz.evidence import collect_evidence
from impl.fuzz.ledger import Ledger, open_ledger
from impl.fuzz.sink import FencedSink
from impl.fuzz.workload import KIND, WORKFLOW
from impl.store import open_store
from model.errors import JobledgerError
from model.record import Event, Plan
from model.retention import PrunedJob
from model.store import Store

WORKER_OPERATIONS = (
    "lease_next",
    "renew",
    "release",
    "advance",
    "fail",
    "effect_start",
    "effect_record",
    "effect_abort",
    "effect.",
)
FAILPOINTS = tuple(name for name in ALL if name.startswith(WORKER_OPERATIONS))
"""The failpoints a fuzz worker hits, so an armed kill has a chance to fire."""

log = logging.getLogger(__name__)

STOP_TIMEOUT = 15.0
KILL_TIMEOUT = 10.0


@frozen(kw_only=True)
class FuzzSettings:
    """How one fuzz run goes. Durations are real seconds unless they say simulated.

    Args:
        seconds: length of the chaos phase.
        seed: the seed of every random decision.
        workers: worker processes kept alive.
        jobs: the most jobs to plan; None keeps a backlog planned for the whole run.
        ttl: lease TTL in simulated seconds.
        step: the mean clock step per tick, in simulated seconds.
        tick: real seconds between clock steps.
        jump_rate: chance per tick that the clock jumps past the TTL.
        lifetime: a worker is SIGKILLed this many real seconds (uniform range) after it
            starts working; the ``survive_rate`` share of workers lives up to five times
            the range's top instead.
        failpoint_rate: share of workers started with an ``N*kill`` failpoint armed.
        liveness_steps: clock steps of the drain within which every job must be terminal.
        drain_timeout: real seconds the drain may take before the run gives up on it.
        min_kills: the chaos phase goes on past ``seconds`` until this many kills, up
            to ``max_seconds`` (default twice ``seconds``), so a slow machine still gets them.
        pause: the longest real-seconds pause inside an effect, before it writes to the sink.
        backlog: non-terminal jobs kept planned during the chaos.
        max_attempts: attempts per job before it fails for good.
        child_module: the worker process's module (tests swap in deliberately broken ones).
        child_env: extra environment for worker processes.
        keep: keep the run's folder even when the run passes.
        db: where the ledger lives: None for a SQLite file in the run's folder, or a
            ``postgresql://`` URL, in which case the run uses a fresh schema there.
        disconnect_every: on PostgreSQL, real seconds (uniform range) between two
            server-side disconnects of a random worker's sessions during the chaos.
        min_disconnects: like ``min_kills``, for the server-side disconnects.
        prune_every: real seconds (uniform range) between two prunes by the parent during
            the chaos, while the workers run; None for no prunes. Each prune removes the
            jobs that finished ``prune_age`` simulated seconds ago or earlier, in batches
            of ``prune_batch``, and archives them: the checker reads the archived jobs
            with the ledger's, so a prune that lost or damaged a job is caught.
        concurrency: handler threads per worker process (``Worker(concurrency=...)``).
        group_window: the workers' ``sqlite_group_window`` (SQLite: their threads' writes
            share group transactions, and the kills include the group failpoints).
        ledger_threads: the workers' ``Worker(ledger_threads=...)`` (their threads' ledger
            calls made on ledger threads), and the kills include their failpoints.
    """

    seconds: float = 100.0
    seed: int = 0
    workers: int = 4
    jobs: int | None = None
    ttl: float = 20.0
    step: float = 0.5
    tick: float = 0.02
    jump_rate: float = 0.01
    lifetime: tuple[float, float] = (0.05, 1.5)
    survive_rate: float = 0.1
    failpoint_rate: float = 0.6
    liveness_steps: int = 3000
    drain_timeout: float = 120.0
    min_kills: int = 0
    max_seconds: float | None = None
    pause: float = 0.01
    backlog: int = 12
    max_attempts: int = 25
    child_module: str = "impl.fuzz.child"
    child_env: Mapping[str, str] = field(factory=dict)
    keep: bool = False
    db: str | None = None
    disconnect_every: tuple[float, float] = (0.5, 3.0)
    min_disconnects: int = 0
    prune_every: tuple[float, float] | None = None
    prune_age: float = 5.0
    prune_batch: int = 4
    concurrency: int = 1
    group_window: float = 0.0
    ledger_threads: int = 0


@frozen(kw_only=True)
class FuzzResult:
    """The figures and the verdict of one run."""

    seed: int
    seconds: float
    workers: int
    runtime: float
    jobs: int
    by_state: Mapping[str, int]
    kills_random: int
    kills_failpoint: int
    spawned: int
    clock_jumps: int
    leases: int
    leases_lost: int
    effects: int
    executions: int
    reexecutions: int
    fenced_out: int
    in_doubt: int
    torn_lines: int
    drain_steps: int
    liveness_steps: int
    violations: tuple[Violation, ...]
    folder: Path | None
    backend: str = "sqlite"
    ledger: str = ""
    disconnects: int = 0
    storage_errors: int = 0
    schema_kept: str | None = None
    pruned: int = 0
    prunes: int = 0

    @property
    def kills(self) -> int:
        """Every SIGKILL a worker received, from the parent or from a failpoint."""
        return self.kills_random + self.kills_failpoint

    @property
    def ok(self) -> bool:
        """True when the checker found nothing."""
        return not self.violations


@define
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    err: IO[bytes]
    log: Path
    doomed: bool
    failpoint: str
    kill_at: float | None = None


@define
class _Run:
    settings: FuzzSettings
    folder: Path
    rng: Random
    clock: SharedClock
    store: Store
    ledger: Ledger
    children: dict[str, _Child] = field(factory=dict)
    planned: list[str] = field(factory=list)
    spawned: int = 0
    kills_random: int = 0
    kills_failpoint: int = 0
    jumps: int = 0
    disconnects: int = 0
    killed: set[str] = field(factory=set)
    worker_errors: list[str] = field(factory=list)
    draining: bool = False
    archived: list[PrunedJob] = field(factory=list)
    prunes: int = 0

    @property
    def sink(self) -> Path:
        return self.folder / "sink.sqlite"

    @property
    def logs(self) -> Path:
        return self.folder / "histories"

    def spawn(self) -> None:
        s = self.settings
        name = f"w{self.spawned:04d}"
        self.spawned += 1
        spec = ChildSpec(
            name=name,
            seed=self.rng.randrange(2**32),
            db=self.ledger.target(name),
            sink=str(self.sink),
            clock=str(self.clock.path),
            log=str(self.logs / f"{name}.jsonl"),
            ttl=s.ttl,
            renew_every=0.1,
            idle_poll=0.05,
            max_attempts=s.max_attempts,
            backoff_base=s.step,
            backoff_cap=s.step * 10,
            busy_timeout=30.0,
            pause=s.pause,
            yield_rate=0.1,
            schema=self.ledger.schema,
            concurrency=s.concurrency,
            group_window=s.group_window,
            ledger_threads=s.ledger_threads,
        )
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        root = str(Path(impl.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env.update(s.child_env)
        failpoint = ""
        if not self.draining and self.rng.random() < s.failpoint_rate:
            # Grouped workers die at the group's own failpoints half the time: they
            # are three among dozens, and the new path's crashes are the point.
            grouped = s.group_window > 0 and self.rng.random() < 0.5
            # The same for a ledger thread's own failpoints.
            ledger = s.ledger_threads > 0 and self.rng.random() < 0.5
            # An ungrouped SQLite worker queues its writes (impl.sqlite.writers): a fifth
            # die holding the queue, so the next writer must take it from a dead holder.
            queued = (
                self.ledger.backend == "sqlite" and s.group_window == 0 and self.rng.random() < 0.2
            )
            points = (
                GROUP_POINTS
                if grouped
                else LEDGER_THREAD_POINTS
                if ledger
                else WRITERS_POINTS
                if queued
                else FAILPOINTS
            )
            failpoint = f"{self.rng.choice(points)}={self.rng.randint(1, 6)}*kill"
            env[ENV_VAR] = failpoint
        doomed = not self.draining
        err = (self.logs / f"{name}.err").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", s.child_module, spec.to_json()],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            env=env,
            cwd=self.folder,
        )
        self.children[name] = _Child(name, proc, err, Path(spec.log), doomed, failpoint)

    def reap(self) -> None:
        for name, child in list(self.children.items()):
            rc = child.proc.poll()
            if rc is None:
                continue
            child.err.close()
            del self.children[name]
            if name in self.killed:
                self.kills_random += 1
            elif rc == -signal.SIGKILL:
                self.kills_failpoint += 1
            else:
                tail = (self.logs / f"{name}.err").read_text(errors="replace")[-2000:]
                self.worker_errors.append(f"worker {name} exited with {rc}: {tail.strip()}")

    def kill_due(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            if child.doomed and child.kill_at is None and child.log.exists():
                # Timed from when the worker has started working, not from its spawn:
                # a kill during interpreter start-up tests nothing.
                low, high = self.settings.lifetime
                if self.rng.random() < self.settings.survive_rate:
                    # A long-lived worker now and then: jobs also need to see a worker
                    # that runs many of them in a row, renewing as it goes.
                    low, high = high, high * 5
                child.kill_at = now + self.rng.uniform(low, high)
            if child.kill_at is not None and child.kill_at <= now and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGKILL)
                self.killed.add(child.name)
                child.kill_at = None
                child.doomed = False

    def disconnect(self, rng: Random) -> None:
        """Cut one random working worker's sessions from the server side."""
        working = sorted(c.name for c in self.children.values() if c.log.exists())
        if working:
            self.disconnects += self.ledger.disconnect(rng.choice(working))

    def top_up(self) -> int:
        """Plan more jobs when the backlog runs low; return the non-terminal count."""
        s = self.settings
        pending = self.pending()
        room = s.backlog - pending
        if s.jobs is not None:
            room = min(room, s.jobs - len(self.planned))
        if room > 0 and not self.draining:
            base = len(self.planned)
            items = [
                Plan({"n": base + i, "seed": s.seed}, payload={"flaky": self.rng.random() < 0.1})
                for i in range(room)
            ]
            self.planned += self.store.plan_many(KIND, items)
            pending += room
        return pending

    def prune(self) -> None:
        """Prune the jobs that finished long enough ago, archiving them for the checker."""
        s = self.settings
        self.store.prune(
            finished_before=self.clock.now - s.prune_age,
            batch_size=s.prune_batch,
            archive=self.archived.extend,
        )
        self.prunes += 1

    def pending(self) -> int:
        counts = self.store.stats().by_state.get(KIND, {})
        return sum(n for state, n in counts.items() if not WORKFLOW.is_terminal(state))

    def chaos(self) -> None:
        s = self.settings
        begin = time.monotonic()
        deadline = begin + s.seconds
        hard = begin + (s.max_seconds if s.max_seconds is not None else 2 * s.seconds)
        next_plan = next_reconcile = 0.0
        # A random source of its own, so a seed's kills and clock are the same on every
        # backend, with or without disconnects.
        cuts = Random(f"disconnect-{s.seed}")
        next_disconnect = begin + cuts.uniform(*s.disconnect_every)
        prunes = Random(f"prune-{s.seed}")
        next_prune = begin + prunes.uniform(*s.prune_every) if s.prune_every else None
        for _ in range(s.workers):
            self.spawn()
        while (now := time.monotonic()) < deadline or (
            now < hard
            and (
                self.kills_random + self.kills_failpoint < s.min_kills
                or (self.ledger.can_disconnect and self.disconnects < s.min_disconnects)
            )
        ):
            time.sleep(s.tick)
            self.clock.advance(s.step * self.rng.uniform(0.5, 1.5))
            if self.rng.random() < s.jump_rate:
                self.clock.advance(s.ttl * self.rng.uniform(1.0, 1.5))
                self.jumps += 1
            self.kill_due()
            self.reap()
            while len(self.children) < s.workers:
                self.spawn()
            if now >= next_plan:
                self.top_up()
                next_plan = now + 0.25
            if now >= next_reconcile:
                self.store.reconcile()
                next_reconcile = now + self.rng.uniform(1.0, 3.0)
            if self.ledger.can_disconnect and now >= next_disconnect:
                self.disconnect(cuts)
                next_disconnect = now + cuts.uniform(*s.disconnect_every)
            if next_prune is not None and s.prune_every is not None and now >= next_prune:
                self.prune()
                next_prune = now + prunes.uniform(*s.prune_every)

    def drain(self) -> tuple[float, int]:
        """Run the drain; return when it began (simulated) and the steps it took."""
        s = self.settings
        self.draining = True
        for child in self.children.values():
            child.doomed = False
            child.kill_at = None
        started_at = self.clock.now
        self.store.reconcile()
        self.clock.advance(s.ttl + s.step)
        self.store.reconcile()
        deadline = time.monotonic() + s.drain_timeout
        steps = 0
        while steps < s.liveness_steps and time.monotonic() < deadline:
            self.reap()
            while len(self.children) < s.workers:
                self.spawn()
            if steps % 5 == 0 and self.pending() == 0:
                break
            time.sleep(s.tick)
            self.clock.advance(s.step)
            steps += 1
            if steps % 100 == 0:
                self.store.reconcile()
        return started_at, steps

    def stop(self) -> int:
        """SIGTERM every worker, wait (bounded), SIGKILL the rest; return how many needed it."""
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        forced = 0
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in self.children.values():
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                forced += 1
        self.kill_all()
        return forced

    def kill_all(self) -> None:
        """SIGKILL and reap every child that is still running (the watchdog of last resort)."""
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=KILL_TIMEOUT)
            child.err.close()
        self.children.clear()


def run_fuzz(directory: Path, settings: FuzzSettings) -> FuzzResult:
    """Run one fuzz in a new folder under ``directory`` and check it.

    The folder (database, histories, sink, worker stderr) is removed when the run
    passes and kept, for the post-mortem, when it does not (or when ``keep`` is set).
    A PostgreSQL ledger's schema (``settings.db``) goes or stays with the folder.
    """
    s = settings
    started = time.monotonic()
    # Workers run with the run's folder as their working directory, so every path they
    # are handed must be absolute.
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"jobledger-fuzz-{s.seed}-", dir=directory))
    (folder / "histories").mkdir()
    rng = Random(s.seed)
    clock = SharedClock(folder / "clock.bin")
    passed = False
    ledger: Ledger | None = None
    try:
        ledger = open_ledger(folder, s.db, seed=s.seed)
        store = open_store(ledger.target("parent"), clock=clock, config=_config(s, ledger))
    except BaseException:
        # Nothing ran yet: nothing to keep.
        clock.close()
        if ledger is not None:
            with contextlib.suppress(JobledgerError):
                ledger.close(discard=True)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    run = _Run(settings=s, folder=folder, rng=rng, clock=clock, store=store, ledger=ledger)
    try:
        store.register(WORKFLOW)
        FencedSink(run.sink).close()
        run.top_up()
        run.chaos()
        drain_started_at, drain_steps = run.drain()
        run.stop()
        run.reap()
        evidence, torn = collect_evidence(
            store,
            planned=run.planned,
            logs=run.logs,
            sink=run.sink,
            integrity=ledger.integrity(),
            drain_started_at=drain_started_at,
            step=s.step,
            liveness_steps=s.liveness_steps,
            worker_errors=run.worker_errors,
            archived=run.archived,
        )
        by_state: dict[str, int] = {}
        for info in evidence.jobs.values():
            by_state[info.state] = by_state.get(info.state, 0) + 1
        violations = tuple(check(evidence))
        passed = not violations
        if not passed or s.keep:
            # For the post-mortem: what was planned, and what the checker found.
            (folder / "planned.json").write_text(json.dumps(run.planned, indent=0))
            (folder / "violations.txt").write_text("".join(f"{v}\n" for v in violations))
            (folder / "ledger.txt").write_text(f"{ledger.backend} {ledger.where()}\n")
        return _result(
            run,
            ev=evidence,
            by_state=by_state,
            torn=torn,
            drain_steps=drain_steps,
            violations=violations,
            started=started,
            passed=passed,
        )
    finally:
        run.kill_all()
        with contextlib.suppress(JobledgerError):
            store.close()
        clock.close()
        discard = passed and not s.keep
        try:
            ledger.close(discard=discard)
        except JobledgerError as exc:
            # The verdict is in; a server gone by now must not turn a green run red.
            log.warning("fuzz run %s: %s", s.seed, exc)
        if discard:
            shutil.rmtree(folder, ignore_errors=True)


def _config(s: FuzzSettings, ledger: Ledger) -> impl.Config:
    cfg = impl.Config(
        lease_ttl=s.ttl,
        max_attempts=s.max_attempts,
        backoff_base=s.step,
        backoff_cap=s.step * 10,
        busy_timeout=30.0,
    )
    return cfg if ledger.schema is None else attrs.evolve(cfg, postgres_schema=ledger.schema)


def _result(
    run: _Run,
    *,
    ev: Evidence,
    by_state: dict[str, int],
    torn: int,
    drain_steps: int,
    violations: tuple[Violation, ...],
    started: float,
    passed: bool,
) -> FuzzResult:
    accepted: dict[str, int] = {}
    for x in ev.executions:
        if x.accepted:
            accepted[x.op_key] = accepted.get(x.op_key, 0) + 1
    events = [h for hs in ev.history.values() for h in hs]
    return FuzzResult(
        seed=run.settings.seed,
        seconds=run.settings.seconds,
        workers=run.settings.workers,
        runtime=time.monotonic() - started,
        jobs=len(run.planned),
        by_state=by_state,
        kills_random=run.kills_random,
        kills_failpoint=run.kills_failpoint,
        spawned=run.spawned,
        clock_jumps=run.jumps,
        leases=sum(h.event == Event.LEASED for h in events),
        leases_lost=sum(e.get("ev") == "lost" for e in ev.entries),
        effects=sum(len(es) for es in ev.effects.values()),
        executions=len(ev.executions),
        reexecutions=sum(n - 1 for n in accepted.values()),
        fenced_out=sum(not x.accepted for x in ev.executions),
        in_doubt=sum(h.event == Event.EFFECT_IN_DOUBT for h in events),
        torn_lines=torn,
        drain_steps=drain_steps,
        liveness_steps=run.settings.liveness_steps,
        violations=violations,
        folder=None if passed and not run.settings.keep else run.folder,
        backend=run.ledger.backend,
        ledger=run.ledger.where(),
        disconnects=run.disconnects,
        storage_errors=sum(
            e.get("ev") == "error" and str(e.get("error")).startswith("StorageError")
            for e in ev.entries
        ),
        schema_kept=None if passed and not run.settings.keep else run.ledger.schema,
        pruned=len(run.archived),
        prunes=run.prunes,
    )
