"""The download handler: drives one ``download`` job through its workflow, crash-safely.

States and the effect recorded before each move (CONTRACT section 5 and 6)::

    PLANNED --HEAD--> HEAD_DONE --(partial usable)--> RESUME_OK --> STREAMING
       |                  |  \\______________________________________/  |
       |                  |                                     STREAM, FINALIZE
       +--------+---------+                                           v
                v                                  FINALIZED --INDEX--> INDEXED
        SKIPPED_DUPLICATE                              \\--INDEX, DEDUPE--> DEDUPED

* ``HEAD`` asks the server about the URL and claims its final URL and validators in the
  artifact index; when an earlier job holds that claim and has not failed, the result
  names it and the job moves to ``SKIPPED_DUPLICATE`` (the earlier job wins: "earlier"
  is the job whose ``HEAD`` claimed first, so two jobs never skip because of each other).
  For a fresh job (no partial file, no ``HEAD`` recorded) the question is the ``GET`` of
  the body itself: ``HEAD`` records what its status and headers say (the same result a
  ``HEAD`` request gives), and ``STREAM`` reads the body from that still-open response,
  after ``HEAD_DONE``, ``STREAMING`` and its own start are durable: one request per file.
  The response is closed on every way out of the call; a job interrupted in between
  makes its ordinary ``GET`` when it runs again.
* ``STREAMING`` is entered *before* ``STREAM`` runs: it marks that bytes may be on disk.
  ``STREAM`` writes the job's partial file (resuming it with Range when the server and
  the validators allow) and checks the manifest's ``sha256``; ``FINALIZE`` moves it into
  the content-addressed store. ``FINALIZED`` is entered after both are recorded.
* ``INDEX`` records the artifact in the index; when identical bytes were indexed first by
  another job, ``DEDUPE`` records that and the job ends ``DEDUPED`` (one copy on disk),
  else ``INDEXED``.

Every call re-derives what to do from the job's state and replays recorded effects, so a
crash at any point resumes correctly. An operator ``retry`` of a job that failed while
streaming starts a new *round*: ``STREAM`` and ``FINALIZE`` carry ``extras={"round": n}``
(n = retries so far), so the bytes are fetched again instead of replaying a result whose
file is gone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from attrs import asdict

from impl.download.cas import Layout
from impl.download.errors import ArtifactMissing, ChecksumMismatch, DownloadError
from impl.download.host import HostDeferred
from impl.download.http import HeadInfo, HttpClient, OpenResponse
from impl.download.index import Artifact, ArtifactIndex
from impl.download.stream import stream_to_part
from impl.download.url import canonical_url
from impl.outcome import RetryLater
from impl.world import EnvironmentFault, Fault, WorldPaused, fault_of
from model.config import Config
from model.errors import DatabaseFull, DatabaseReadOnly, InvalidInput, UnknownJob
from model.key import Scalar, canon
from model.record import JSON, EffectContext, Event, Lease
from model.store import EffectFn, OnDoubt, Store
from model.validate import storable_text

KIND = "download"
PLANNED = "PLANNED"
HEAD_DONE = "HEAD_DONE"
RESUME_OK = "RESUME_OK"
STREAMING = "STREAMING"
FINALIZED = "FINALIZED"
INDEXED = "INDEXED"
DEDUPED = "DEDUPED"
SKIPPED_DUPLICATE = "SKIPPED_DUPLICATE"
FAILED = "FAILED"
TERMINAL = frozenset({INDEXED, DEDUPED, SKIPPED_DUPLICATE, FAILED})
SUCCEEDED = frozenset({INDEXED, DEDUPED, SKIPPED_DUPLICATE})


class Context(Protocol):
    """What the handler needs from ``impl.worker.JobContext``."""

    @property
    def store(self) -> Store: ...

    @property
    def lease(self) -> Lease: ...

    @property
    def state(self) -> str: ...

    def advance(self, state: str) -> bool: ...

    def effect(
        self,
        op: str,
        fn: EffectFn,
        *,
        extras: dict[str, Scalar] | None = None,
        on_doubt: OnDoubt = "retry",
        then: str | None = None,
    ) -> JSON: ...

    def renew(self, *, ttl: float | None = None) -> Lease: ...


def _claim_key(head: HeadInfo) -> str:
    try:
        final = canonical_url(head.final_url)
    except InvalidInput:
        final = head.final_url
    return hashlib.sha256(canon([final, head.etag, head.last_modified])).hexdigest()


def _round(store: Store, job_id: str) -> int:
    return sum(1 for event in store.history(job_id) if event.event == Event.RETRIED)


def _latest_result(store: Store, job_id: str, op: str) -> dict[str, JSON]:
    results = [e.result for e in store.effects(job_id) if e.op == op and e.status == "done"]
    if not results or not isinstance(results[-1], dict):
        raise ArtifactMissing(
            f"job {job_id} is past {op} but no {op} result is recorded; the ledger and "
            "the workflow disagree, inspect it with `jobledger show`"
        )
    return results[-1]


class DownloadHandler:
    """The ``download`` handler for :class:`impl.Worker`: ``handlers={"download": h}``.

    Args:
        out_dir: the output directory (objects, partial files, index).
        config: the ``download_*`` settings.
        client: the HTTP client (default one built from ``config``; thread-safe, shared).
        on_bytes: called with each chunk's size while streaming (progress bars).
        on_fault: called with the :class:`Fault` when the world refuses a write (the
            download run stops on it); the job is handed back either way.
        world_delay: seconds a job handed back after a fault waits; default
            ``download_world_delay``. A run that stops at the first fault passes 0, so
            that running it again after the fix starts at once.
    """

    def __init__(
        self,
        out_dir: str,
        *,
        config: Config,
        client: HttpClient | None = None,
        on_bytes: Callable[[int], None] | None = None,
        on_fault: Callable[[Fault], None] | None = None,
        world_delay: float | None = None,
    ) -> None:
        self.config = config
        self.on_fault = on_fault
        self.world_delay = config.download_world_delay if world_delay is None else world_delay
        self.layout = Layout(out_dir)
        self.layout.ensure()
        self.index = ArtifactIndex(self.layout.root)
        self.client = client if client is not None else HttpClient(config)
        self.on_bytes = on_bytes

    def close(self) -> None:
        """Close the index connections the workers opened; call it once they stopped."""
        self.index.close()

    def __call__(self, ctx: Context) -> None:
        """Drive the leased job as far as it goes; a permanent error fails it at once.

        A fault of the world (a full disk, a read-only mount, a full ledger: see
        ``impl/world.py``) raises :class:`WorldPaused`, a :class:`impl.RetryLater`: the
        job is released with ``download_world_delay`` and no attempt is spent. So does
        a host that cannot be asked now (its breaker is open, or it asked to slow
        down: ``host.py``), for as long as that lasts.
        """
        try:
            self._drive(ctx)
        except EnvironmentFault as exc:
            raise self._pause(exc.fault) from exc
        except HostDeferred as exc:
            # The host is down or asks everyone to slow down: not this job's fault.
            raise RetryLater(str(exc), delay=exc.delay) from exc
        except (OSError, DatabaseFull, DatabaseReadOnly) as exc:
            # A ledger error names no path: the caller knows the ledger's (the CLI
            # names its target), and the output directory would be the wrong one.
            fault = fault_of(exc, path=self.layout.root if isinstance(exc, OSError) else None)
            if fault is None:
                raise
            raise self._pause(fault) from exc
        except DownloadError as exc:
            if exc.retryable:
                raise
            error = storable_text(f"{type(exc).__name__}: {exc}")  # see Worker
            ctx.store.fail(ctx.lease, error, retryable=False)

    def _pause(self, fault: Fault) -> WorldPaused:
        if self.on_fault is not None:
            self.on_fault(fault)
        return WorldPaused(fault, delay=self.world_delay)

    # -- the state machine -----------------------------------------------------------

    def _drive(self, ctx: Context) -> None:
        body = _Body()
        try:
            self._steps(ctx, body)
        finally:
            # The GET a fresh job's HEAD opened, if nothing read it: a ledger write that
            # failed in between (a lost lease, a full ledger), a duplicate, a crash.
            body.close()

    def _steps(self, ctx: Context, body: _Body) -> None:
        state = ctx.state
        if state in TERMINAL:
            return
        job_id = ctx.lease.job_id
        # The HEAD result is asked of the ledger once per call and then carried along:
        # a recorded result never changes, and every later write is fenced on its own,
        # so asking again (a whole fenced transaction each time) would only cost.
        head: dict[str, JSON] | None = None
        final: dict[str, JSON] | None = None
        if state == PLANNED:
            # HEAD_DONE is entered with the HEAD result, in its transaction; a duplicate
            # goes on from there (SKIPPED_DUPLICATE is entered from PLANNED or HEAD_DONE).
            head = self._head(ctx, body=body, then=HEAD_DONE)
            state = HEAD_DONE
            if head.get("duplicate_of"):
                body.close()
                ctx.advance(SKIPPED_DUPLICATE)
                return
        if state == HEAD_DONE:
            head = head if head is not None else self._head(ctx)
            info = HeadInfo.from_json(head["head"])
            part = self.layout.part_path(job_id)
            if _has_bytes(part) and _resumable(info):
                body.close()  # the bytes on disk are continued with a ranged request
                ctx.advance(RESUME_OK)
                state = RESUME_OK
        if state in (HEAD_DONE, RESUME_OK):
            ctx.advance(STREAMING)
            state = STREAMING
        if state == STREAMING:
            head = head if head is not None else self._head(ctx)
            info = HeadInfo.from_json(head["head"])
            extras: dict[str, Scalar] = {"round": _round(ctx.store, job_id)}
            # The open response is taken only by a STREAM that runs (its start durable);
            # a replayed STREAM leaves it to the close below.
            stream = ctx.effect(
                "STREAM", lambda _e: self._stream(ctx, info, body.take()), extras=extras
            )
            body.close()
            assert isinstance(stream, dict)
            sha, size = str(stream["sha256"]), int(str(stream["size"]))
            done = ctx.effect(
                "FINALIZE",
                lambda _e: self._finalize(job_id, sha, size),
                extras=extras,
                then=FINALIZED,
            )
            assert isinstance(done, dict)
            final = done
            state = FINALIZED
        if state == FINALIZED:
            self._index(ctx, head=head, final=final)

    # -- effects -----------------------------------------------------------------------

    def _head(
        self, ctx: Context, *, body: _Body | None = None, then: str | None = None
    ) -> dict[str, JSON]:
        """Run (or replay) ``HEAD``, entering ``then`` with its result. With ``body`` and
        no partial file, the request is the GET of the body, kept open in ``body`` for
        ``STREAM`` (see the module docstring)."""
        job_id = ctx.lease.job_id
        url = str(ctx.lease.identity["canonical_url"])

        def run(_e: EffectContext) -> JSON:
            if body is not None and not _has_bytes(self.layout.part_path(job_id)):
                info, opened = self.client.head_by_get(url)
                body.keep(opened)
            else:
                info = self.client.head(url)
            key = _claim_key(info)
            holder = self.index.claim(key, job_id, info.final_url)
            if holder != job_id and _repair_of(ctx.lease.payload) == holder:
                # A repair job refetches the bytes its original lost: it owns the claim now.
                holder = self.index.claim(key, job_id, info.final_url, replace=holder)
            if holder != job_id:
                try:
                    holder_state: str | None = ctx.store.state(holder)
                except UnknownJob:
                    holder_state = None
                if holder_state in (None, FAILED):
                    # The holder failed (or belongs to another ledger): this job takes over.
                    holder = self.index.claim(key, job_id, info.final_url, replace=holder)
            return {"head": info.to_json(), "duplicate_of": holder if holder != job_id else None}

        result = ctx.effect("HEAD", run, then=then)
        assert isinstance(result, dict)
        return result

    def _stream(self, ctx: Context, info: HeadInfo, opened: OpenResponse | None = None) -> JSON:
        job_id = ctx.lease.job_id
        url = str(ctx.lease.identity["canonical_url"])
        part = self.layout.part_path(job_id)
        ttl = self.config.download_lease_ttl
        outcome = stream_to_part(
            self.client,
            url,
            part,
            validator=info.validator(),
            allow_resume=_resumable(info),
            renew=lambda: ctx.renew(ttl=ttl),
            on_bytes=self.on_bytes,
            opened=opened,
        )
        expected = _expected_sha(ctx.lease.payload)
        if expected is not None and outcome.sha256 != expected:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{url}: the {outcome.size} bytes received hash to {outcome.sha256}, but the "
                f"manifest says sha256 {expected}; the partial file was removed. Check the "
                "manifest or the server, then `jobledger retry` the job",
                url=url,
            )
        return outcome.to_json()

    def _finalize(self, job_id: str, sha: str, size: int) -> JSON:
        done = self.layout.finalize(job_id, sha, size)
        return {"sha256": sha, "size": size, "path": done.path, "existed": done.existed}

    def _index(
        self,
        ctx: Context,
        *,
        head: dict[str, JSON] | None = None,
        final: dict[str, JSON] | None = None,
    ) -> None:
        """Run ``INDEX`` (and ``DEDUPE``); ``head`` and ``final`` are the ``HEAD`` and
        ``FINALIZE`` results when this call already has them (else read from the ledger:
        the job was finalized by an earlier lease)."""
        job_id = ctx.lease.job_id
        identity = ctx.lease.identity
        info = HeadInfo.from_json((head if head is not None else self._head(ctx))["head"])
        if final is None:
            final = _latest_result(ctx.store, job_id, "FINALIZE")
        artifact = Artifact(
            job_id=job_id,
            artifact_id=str(identity["artifact_id"]),
            work_id=str(identity["work_id"]),
            url=str(identity["canonical_url"]),
            final_url=info.final_url,
            sha256=str(final["sha256"]),
            size=int(str(final["size"])),
            content_type=info.content_type,
            path=str(final["path"]),
        )

        def index(_e: EffectContext) -> JSON:
            stored = self.index.add(artifact)
            return dict(asdict(stored))

        row = ctx.effect("INDEX", index)
        assert isinstance(row, dict)
        duplicate_of = row.get("duplicate_of")
        if duplicate_of:
            ctx.effect(
                "DEDUPE",
                lambda _e: {
                    "duplicate_of": duplicate_of,
                    "path": row["path"],
                    "bytes_saved": row["size"],
                },
            )
            ctx.advance(DEDUPED)
        else:
            ctx.advance(INDEXED)


class _Body:
    """The response a fresh job's ``HEAD`` step opened, until ``STREAM`` takes it."""

    def __init__(self) -> None:
        self._opened: OpenResponse | None = None

    def keep(self, opened: OpenResponse | None) -> None:
        self.close()  # an effect run again (in doubt) replaces what an earlier run opened
        self._opened = opened

    def take(self) -> OpenResponse | None:
        opened, self._opened = self._opened, None
        return opened

    def close(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            opened.close()


def _has_bytes(part: Path) -> bool:
    return part.is_file() and part.stat().st_size > 0


def _resumable(info: HeadInfo) -> bool:
    return info.accept_ranges and info.validator() is not None


def _expected_sha(payload: JSON) -> str | None:
    if isinstance(payload, dict):
        sha = payload.get("sha256")
        if isinstance(sha, str):
            return sha
    return None


def _repair_of(payload: JSON) -> str | None:
    if isinstance(payload, dict):
        value = payload.get("repair_of")
        if isinstance(value, str):
            return value
    return None
