"""``download``: plan one job per manifest entry, run workers until every job is terminal.

This is what ``jobledger download MANIFEST --out DIR --workers N`` calls. It

1. parses and validates the whole manifest (nothing is planned if a line is bad, unless
   ``skip_invalid``);
2. plans the jobs in one transaction (idempotent: a rerun plans nothing new);
3. reconciles the output directory (dead partial files removed; finished jobs whose
   bytes are gone are reported and get a repair job, see ``reconcile.py``);
4. runs **one** :class:`impl.Worker` with ``concurrency=N``: N handler *threads* in this
   process, sharing one HTTP client (so the per-host limit holds across them);
5. watches the jobs until all are terminal, reporting progress, and returns a summary.

After a crash, running it again resumes: finished jobs are replayed from the ledger and
make no HTTP request; a half-streamed file continues with a Range request. Leases use
``download_lease_ttl`` (10 s by default), renewed while streaming, so a dead worker's
job is free again within that time. A lease still held by a worker that was a process
on this machine and no longer exists (worker names are ``host:pid:n``) is reported
through ``progress.on_wait`` with the seconds left until it expires; when it has
expired, a ledger ``reconcile`` marks its unfinished effects in doubt and the job is
leased again at once. (Only the store can end a lease, and it does so by the clock: a
dead holder shortens nothing, but the user sees why the run waits.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from attrs import define, field, frozen

from impl.download.cas import Layout
from impl.download.host import BreakerEvent, HostGuard, HostReport
from impl.download.http import HttpClient
from impl.download.index import ArtifactIndex
from impl.download.manifest import Manifest, parse_manifest
from impl.download.pipeline import (
    DEDUPED,
    FAILED,
    INDEXED,
    KIND,
    SKIPPED_DUPLICATE,
    TERMINAL,
    DownloadHandler,
)
from impl.download.reconcile import DiskReport, plan_repairs, reconcile_disk
from impl.download.url import host_key
from impl.store import open_store
from impl.worker import Worker, default_worker_name
from impl.world import EnvironmentFault, Fault, LedgerReserve, ensure_file_handles, fault_of
from model.config import Config
from model.errors import (
    DatabaseFull,
    DatabaseReadOnly,
    InvalidInput,
    JobledgerError,
    StorageError,
)
from model.store import Store
from model.validate import storable_text

POLL_SECONDS = 0.2
SCAN_PENDING = 128
"""Still-pending jobs the watch reads per tick before it stops reading (the rest are
read on every :data:`FULL_SCAN_EVERY`-th tick): a read of every pending job five times a
second grew with the square of the manifest and took the handler threads' interpreter
lock from them."""
FULL_SCAN_EVERY = 10
STOP_JOIN_SECONDS = 60.0


@define
class Progress:
    """Callbacks for a progress display; every one is optional and called from threads.

    Attributes:
        on_start: ``(jobs_total)`` once the jobs are planned.
        on_jobs: ``(jobs_done, jobs_total)`` whenever the count of terminal jobs changes.
        on_bytes: ``(n)`` for every chunk written to disk (add up for bytes and rate).
        on_wait: ``(message, seconds_left)`` while the run waits for a lease held by a
            dead or foreign worker, or for a job's retry backoff; ``seconds_left`` may be
            None when unknown.
    """

    on_start: Callable[[int], None] | None = None
    on_jobs: Callable[[int, int], None] | None = None
    on_bytes: Callable[[int], None] | None = None
    on_wait: Callable[[str, float | None], None] | None = None


@frozen
class FailedArtifact:
    """One job that ended in ``FAILED``."""

    job_id: str
    artifact_id: str
    url: str
    error: str | None


@frozen
class DownloadSummary:
    """What a ``download`` run ended with (counts over the manifest's jobs).

    ``bytes_received`` and ``bytes_resumed`` add up every recorded ``STREAM`` result of
    the jobs (bytes fetched over the network, and bytes that were already on disk when a
    stream resumed). ``bytes_stored`` is the size of the distinct objects written.
    ``hosts`` lists the hosts whose circuit breaker opened or that asked the run to slow
    down (with ``deferred``: jobs handed back without an attempt); ``pending`` jobs of a
    host that stayed down are left for the next run. ``per_host`` is the connections per
    host the run allowed (``download_per_host``, else ``workers``).
    """

    total: int
    succeeded: int
    deduped: int
    skipped: int
    failed: int
    pending: int
    bytes_received: int
    bytes_resumed: int
    bytes_stored: int
    restarts: int
    repaired: int
    elapsed: float
    out_dir: str
    index_path: str
    failures: tuple[FailedArtifact, ...] = ()
    invalid: tuple[str, ...] = ()
    disk: DiskReport = field(factory=DiskReport)
    hosts: tuple[HostReport, ...] = ()
    workers: int = 0
    per_host: int = 0

    @property
    def ok(self) -> bool:
        """True when every job ended in success (indexed, deduplicated or skipped)."""
        return self.failed == 0 and self.pending == 0

    @property
    def exit_code(self) -> int:
        """The CLI's exit code: 0 when all succeeded, 1 when some failed."""
        return 0 if self.ok else 1


def _dead_local(worker: str) -> bool:
    """True if ``worker`` (``host:pid:n``) was a process on this host that is gone."""
    parts = worker.split(":")
    if len(parts) < 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _Watch:
    """The main thread's view of the run: which jobs are still pending, and why."""

    def __init__(self, store: Store, ids: list[str], progress: Progress, own: str) -> None:
        self.store = store
        self.ids = ids
        self.pending = list(dict.fromkeys(ids))
        self.progress = progress
        self.own = own
        self.done = -1
        self.total = len(self.pending)
        self.hosts: dict[str, str] = {}  # job id -> host:port, read once
        self.ticks = 0

    def only_blocked_hosts(self, hosts: HostGuard) -> bool:
        """True when every pending job belongs to a host that is down
        (``HostGuard.blocked``)."""
        if not self.pending:
            return False
        for job_id in self.pending:
            host = self.hosts.get(job_id)
            if host is None:
                info = self.store.job(job_id)
                host = self.hosts[job_id] = host_key(str(info.identity["canonical_url"]))
            if not hosts.blocked(host):
                return False
        # A job of a blocked host that is leased right now cannot succeed either: its
        # requests are refused until the next probe, and blocked() is False while one
        # is out.
        return True

    def tick(self) -> bool:
        """Refresh; return True when every job is terminal.

        Jobs are leased about in planned order, so the pending ones are read from the
        front until :data:`SCAN_PENDING` of them are still pending; every
        :data:`FULL_SCAN_EVERY`-th tick reads them all (a job further on may have ended
        early, and ``only_blocked_hosts`` must not wait on a job that is done).
        """
        full = self.ticks % FULL_SCAN_EVERY == 0
        self.ticks += 1
        still: list[str] = []
        for at, job_id in enumerate(self.pending):
            if self.store.state(job_id) in TERMINAL:
                continue
            still.append(job_id)
            if not full and len(still) >= SCAN_PENDING:
                still.extend(self.pending[at + 1 :])
                break
        self.pending = still
        done = self.total - len(self.pending)
        if done != self.done:
            self.done = done
            if self.progress.on_jobs is not None:
                self.progress.on_jobs(done, self.total)
        if self.pending:
            self._explain_waits()
        return not self.pending

    def _explain_waits(self) -> None:
        wanted = set(self.pending)
        now = self.store.now()
        expired = False
        for row in self.store.leases():
            if row.job_id not in wanted or row.worker.startswith(self.own):
                continue
            if not row.live:
                expired = True
                continue
            left = max(row.expires_at - now, 0.0)
            if _dead_local(row.worker):
                message = (
                    f"job {row.job_id[:12]} is leased by worker {row.worker}, a process on "
                    f"this machine that no longer exists; waiting {left:.1f} s for its "
                    "lease to expire"
                )
            else:
                message = (
                    f"job {row.job_id[:12]} is leased by worker {row.worker}; waiting for "
                    "it to finish or for its lease to expire"
                )
            if self.progress.on_wait is not None:
                self.progress.on_wait(message, left)
        if expired:
            # Dead leases: mark their unfinished effects in doubt so the next lease
            # replays them with on_doubt, and count them in the ledger's history.
            self.store.reconcile()


@define
class _BreakerRecorder:
    """Records the run's breaker transitions in the ledger (``Store.record_breaker``),
    under the run's worker name, for ``jobledger status``."""

    store: Store
    worker: str
    unrecorded: int = 0
    """Transitions the ledger refused (full, read-only, locked)."""

    def __call__(self, event: BreakerEvent) -> None:
        try:
            self.store.record_breaker(
                event.host,
                worker=self.worker,
                state=event.state,
                failures=event.failures,
                # An error text may hold what no store accepts (a NUL): made storable.
                last_error=None if event.last_error is None else storable_text(event.last_error),
                cooldown=event.cooldown,
            )
        except StorageError:
            # The row is a view for operators, not a decision: the run goes on without
            # it. A ledger that refuses this write refuses the jobs' next write too, and
            # that one stops the run with the fault's one line (exit 4).
            self.unrecorded += 1


def _summary(
    store: Store,
    *,
    ids: list[str],
    repairs: list[str],
    manifest: Manifest,
    layout: Layout,
    index_path: Path,
    disk: DiskReport,
    elapsed: float,
    hosts: tuple[HostReport, ...] = (),
    workers: int = 0,
    per_host: int = 0,
) -> DownloadSummary:
    counts = {INDEXED: 0, DEDUPED: 0, SKIPPED_DUPLICATE: 0, FAILED: 0}
    pending = received = resumed = stored = restarts = repaired = 0
    failures: list[FailedArtifact] = []
    repair_set = set(repairs)
    for job_id in dict.fromkeys([*ids, *repairs]):
        info = store.job(job_id)
        if info.state in counts:
            counts[info.state] += 1
        elif info.state not in TERMINAL:
            pending += 1
        if job_id in repair_set and info.state in (INDEXED, DEDUPED):
            repaired += 1
        if info.state == FAILED:
            failures.append(
                FailedArtifact(
                    job_id,
                    str(info.identity.get("artifact_id")),
                    str(info.identity.get("canonical_url")),
                    info.last_error,
                )
            )
        for effect in store.effects(job_id):
            result = effect.result
            if effect.status != "done" or not isinstance(result, dict):
                continue
            if effect.op == "STREAM":
                received += int(str(result.get("received", 0)))
                resumed += int(str(result.get("resumed_from", 0)))
                restarts += int(str(result.get("restarts", 0)))
            elif effect.op == "FINALIZE" and not result.get("existed"):
                stored += int(str(result.get("size", 0)))
    # Repairs of finished jobs are not jobs of the manifest: count them apart.
    base = len(dict.fromkeys(ids))
    return DownloadSummary(
        total=base,
        succeeded=counts[INDEXED],
        deduped=counts[DEDUPED],
        skipped=counts[SKIPPED_DUPLICATE],
        failed=counts[FAILED],
        pending=pending,
        bytes_received=received,
        bytes_resumed=resumed,
        bytes_stored=stored,
        restarts=restarts,
        repaired=repaired,
        elapsed=elapsed,
        out_dir=str(layout.root),
        index_path=str(index_path),
        failures=tuple(failures),
        invalid=tuple(str(e) for e in manifest.invalid),
        disk=disk,
        hosts=hosts,
        workers=workers,
        per_host=per_host,
    )


@contextlib.contextmanager
def _world_faults(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a refusal of the machine (full disk, read-only mount, full or read-only
    ledger) met anywhere in the run into one :class:`EnvironmentFault`."""
    try:
        yield
    except (OSError, DatabaseFull, DatabaseReadOnly) as exc:
        fault = fault_of(exc, path=out_dir if isinstance(exc, OSError) else None)
        if fault is None:
            raise
        raise EnvironmentFault(fault) from exc


def download(
    store: Store | str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int = 4,
    config: Config | None = None,
    progress: Progress | None = None,
    skip_invalid: bool = False,
    client: HttpClient | None = None,
    stop: threading.Event | None = None,
) -> DownloadSummary:
    """Download every artifact of a manifest into ``out_dir``; resumable after any crash.

    Args:
        store: an open store, or a target for :func:`impl.open_store` (opened and closed
            here, with ``config``).
        manifest_path: a JSON Lines manifest or a plain URL list (see ``manifest.py``).
        out_dir: the output directory (created if missing).
        workers: handler threads of the one worker this run starts.
        config: the tunables (``download_*`` keys); default :class:`Config`.
        progress: callbacks for a progress display.
        skip_invalid: plan the valid lines and list the bad ones in the summary instead
            of refusing the whole manifest.
        client: an HTTP client to use (default one built from ``config``).
        stop: set it to stop the run early (leases are released); the summary then has
            ``pending`` jobs.

    Returns:
        The summary; its ``exit_code`` is 0 when every job succeeded, 1 otherwise.

    Raises:
        ManifestError: a bad manifest line (nothing was planned).
        InvalidInput: ``workers`` < 1.
        EnvironmentFault: the machine refused a write (a full disk or quota, a read-only
            file system, no file handles, a full or read-only ledger). Every job in flight
            was handed back without spending an attempt; run again once it is fixed.
        StorageError: the ledger cannot be used.
        KeyboardInterrupt: after releasing this run's leases (the CLI exits 130).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidInput(f"workers must be an integer >= 1, got {workers!r}")
    cfg = config if config is not None else Config()
    manifest = parse_manifest(manifest_path, skip_invalid=skip_invalid)
    with contextlib.ExitStack() as owned, _world_faults(out_dir):
        if isinstance(store, str | os.PathLike):
            # A target we open is ours to close; a store we were handed is the caller's.
            store = owned.enter_context(open_store(store, config=cfg))
        # A store kept in a file says where (``SqliteStore.path``): hold room beside it
        # for handing jobs back should its disk fill up (see LedgerReserve).
        ledger = getattr(store, "path", None)
        reserve = LedgerReserve(ledger) if isinstance(ledger, Path) else None
        if reserve is not None:
            reserve.hold()
            owned.callback(reserve.free)
        return _download(
            store,
            reserve=reserve,
            manifest=manifest,
            out_dir=out_dir,
            workers=workers,
            cfg=cfg,
            progress=progress,
            client=client,
            stop=stop,
        )


def _download(
    store: Store,
    *,
    manifest: Manifest,
    out_dir: str | os.PathLike[str],
    workers: int,
    cfg: Config,
    progress: Progress | None,
    client: HttpClient | None,
    stop: threading.Event | None,
    reserve: LedgerReserve | None,
) -> DownloadSummary:
    started = time.monotonic()
    ensure_file_handles(workers)
    progress = progress if progress is not None else Progress()
    layout = Layout(out_dir)
    layout.ensure()
    index = ArtifactIndex(layout.root)
    ids = (
        store.plan_many(KIND, [entry.plan() for entry in manifest.entries])
        if manifest.entries
        else []
    )
    disk = reconcile_disk(store, str(layout.root), job_ids=ids)
    repairs = plan_repairs(store, str(layout.root), disk.missing) if disk.missing else []
    watch_ids = [*ids, *repairs]
    if progress.on_start is not None:
        progress.on_start(len(dict.fromkeys(watch_ids)))
    own = default_worker_name()
    per_host = cfg.per_host_limit(workers)
    http = client if client is not None else HttpClient(cfg, per_host=per_host)
    faults: list[Fault] = []

    def on_fault(fault: Fault) -> None:
        # Stop at once: every other job would meet the same full disk. The jobs are
        # handed back eligible now (world_delay=0): the run ends here, and the next run
        # (after the fix) should not wait.
        faults.append(fault)
        if reserve is not None:
            # Before the job is handed back: a full ledger disk needs the room for it.
            reserve.free()
        worker.stop()

    handler = DownloadHandler(
        str(layout.root),
        config=cfg,
        client=http,
        on_bytes=progress.on_bytes,
        on_fault=on_fault,
        world_delay=0.0,
    )

    def on_worker_error(exc: JobledgerError) -> None:
        # A fault the worker met outside the handler (taking a lease from a full or
        # read-only ledger) stops the run the same way.
        fault = fault_of(exc)
        if fault is not None:
            on_fault(fault)

    worker = Worker(
        store,
        {KIND: handler},
        name=own,
        ttl=cfg.download_lease_ttl,
        concurrency=workers,
        on_error=on_worker_error,
    )
    watch = _Watch(store, watch_ids, progress, own)
    errors: list[BaseException] = []

    def run_worker() -> None:
        try:
            worker.run(until_idle=False)
        except BaseException as exc:  # reported by the main thread, which owns the run
            errors.append(exc)

    thread = threading.Thread(target=run_worker, name="download-worker", daemon=True)
    if not watch.tick():
        http.hosts.watch(_BreakerRecorder(store, own))
        thread.start()
        try:
            while not watch.tick():
                # A fault of the world stops the run: every other job would meet the
                # same full disk, and each would only be handed back again.
                if errors or faults or (stop is not None and stop.is_set()):
                    break
                if watch.only_blocked_hosts(http.hosts):
                    # What is left waits for hosts that are down (their breakers opened
                    # and a probe after the cool-down failed too): end the run, the jobs
                    # stay pending with their attempts, and the summary names the hosts.
                    break
                time.sleep(POLL_SECONDS)
        finally:
            worker.stop()
            thread.join(STOP_JOIN_SECONDS)
            http.hosts.watch(None)
            if client is None:
                http.close()
    if not thread.is_alive():  # else its connections are left to the garbage collector
        handler.close()
    if errors and isinstance(errors[0], JobledgerError):
        raise errors[0]
    if faults:
        index.close()
        raise EnvironmentFault(faults[0])
    try:
        export = index.export_jsonl()
    finally:
        index.close()
    return _summary(
        store,
        ids=ids,
        repairs=repairs,
        manifest=manifest,
        layout=layout,
        index_path=export,
        disk=disk,
        elapsed=time.monotonic() - started,
        hosts=http.hosts.reports(),
        workers=workers,
        per_host=http.hosts.per_host,
    )
