"""Streaming one artifact into its partial file, resuming with HTTP Range when it is safe.

The rules:

* A partial file is resumed only when the caller allows it (the server accepts byte
  ranges and the artifact has a strong validator); the request then carries
  ``Range: bytes=N-`` and ``If-Range: <validator>``, and the hash is seeded with the N
  bytes already on disk, so it covers the whole file.
* ``206`` with a ``Content-Range`` that starts at N continues the file. A ``200`` (the
  server ignored the range, or ``If-Range`` found the validators changed) restarts from
  zero with that very body. A ``206`` for other bytes restarts from zero with a plain
  request, and so does a ``416`` unless its ``Content-Range: bytes */N`` says the file
  is exactly the N bytes on disk (then the partial file is complete). Every restart is
  counted in the result.
* A body that breaks off (connection reset, timeout, fewer bytes than announced) keeps
  the bytes received, fsyncs them and continues with a ranged request, up to
  ``download_max_retries`` times.
* At most ``download_max_bytes`` are accepted. The lease is renewed and the file fsynced
  every :data:`RENEW_BYTES` bytes or :data:`RENEW_SECONDS` seconds.
* The partial file is locked (``flock``) while it is written: a worker whose lease died
  but whose process still runs cannot interleave its writes with the new holder's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from attrs import frozen

from impl.download.errors import (
    HttpStatusError,
    RangeMismatch,
    TooLarge,
    TransferError,
)
from impl.download.http import BODY_HEADERS, HttpClient, OpenResponse, parse_content_range
from impl.world import EnvironmentFault, fault_of, is_world_error
from model.record import JSON

RENEW_BYTES = 4 * 1024 * 1024
RENEW_SECONDS = 2.0


@frozen
class StreamOutcome:
    """What one ``STREAM`` effect did (its recorded result)."""

    sha256: str
    size: int
    resumed_from: int
    received: int
    restarts: int
    breaks: int
    status: int

    def to_json(self) -> dict[str, JSON]:
        """Return the JSON form recorded as the ``STREAM`` effect's result."""
        return {
            "sha256": self.sha256,
            "size": self.size,
            "resumed_from": self.resumed_from,
            "received": self.received,
            "restarts": self.restarts,
            "breaks": self.breaks,
            "status": self.status,
        }


class _BodyEnded(Exception):
    """The body ended before the announced length (handled like a broken connection)."""


class _Part:
    """The open, locked partial file and the running hash of its bytes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise TransferError(
                f"the partial file {path.name} is locked by another process that is still "
                "writing it (a worker whose lease expired); the job is retried later"
            ) from None
        self.hash = hashlib.sha256()
        self.size = 0

    def load(self) -> int:
        """Hash the bytes already in the file and position at its end; return the size."""
        self.hash = hashlib.sha256()
        self.size = 0
        os.lseek(self.fd, 0, os.SEEK_SET)
        while chunk := os.read(self.fd, 1024 * 1024):
            self.hash.update(chunk)
            self.size += len(chunk)
        return self.size

    def reset(self) -> None:
        """Drop every byte: the next byte written is the first of the artifact."""
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.hash.update(chunk)
        self.size += len(chunk)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def stream_to_part(
    client: HttpClient,
    url: str,
    part_path: Path,
    *,
    validator: str | None,
    allow_resume: bool,
    renew: Callable[[], object] = lambda: None,
    on_bytes: Callable[[int], None] | None = None,
    opened: OpenResponse | None = None,
) -> StreamOutcome:
    """Fetch ``url`` into ``part_path`` and return what happened.

    Args:
        validator: the strong ETag or Last-Modified sent in ``If-Range``.
        allow_resume: resume a non-empty partial file (else it is truncated first).
        renew: called every few MB or seconds; it renews the lease (and raises
            ``LeaseLost`` to stop a worker that lost it).
        on_bytes: called with the number of new bytes after each chunk (progress).
        opened: the response to a plain ``GET`` of ``url`` already opened (by the
            ``HEAD`` step of a fresh job): it is read as the first request's answer,
            from byte zero; it is closed on every path, errors included.

    Raises:
        DownloadError: (a subclass) when the artifact cannot be fetched.
    """
    expected: list[int] = []  # the file's announced total, once a response says it
    try:
        return _stream(
            client,
            url,
            part_path,
            validator=validator,
            allow_resume=allow_resume,
            renew=renew,
            on_bytes=on_bytes,
            expected=expected,
            opened=opened,
        )
    except OSError as exc:
        # Writing the partial file failed: a full disk or a read-only mount is the
        # world's fault, not the job's. The bytes already written stay for a resume.
        if not is_world_error(exc):
            raise
        on_disk = part_path.stat().st_size if part_path.is_file() else 0
        needed = max(expected[-1] - on_disk, 0) if expected else None
        fault = fault_of(exc, path=part_path, needed=needed)
        assert fault is not None
        raise EnvironmentFault(fault) from None
    finally:
        if opened is not None:
            opened.close()  # a no-op once read; else (the file failed to open) release it


def _stream(
    client: HttpClient,
    url: str,
    part_path: Path,
    *,
    validator: str | None,
    allow_resume: bool,
    renew: Callable[[], object],
    on_bytes: Callable[[int], None] | None,
    expected: list[int],
    opened: OpenResponse | None,
) -> StreamOutcome:
    config = client.config
    limit = config.download_max_bytes
    can_range = allow_resume and validator is not None
    part = _Part(part_path)
    try:
        part.load()
        if not can_range:
            part.reset()
        resumed_from = part.size
        received = restarts = breaks = 0
        status = 0
        plain = False
        last_renew = time.monotonic()
        since_renew = 0
        first = opened
        while True:
            headers = dict(BODY_HEADERS)
            # The response opened beforehand answers a request without Range: its body
            # starts at byte zero, whatever is on disk.
            ranged = part.size > 0 and not plain and first is None
            if ranged:
                headers["Range"] = f"bytes={part.size}-"
                headers["If-Range"] = str(validator)
            elif part.size > 0:
                part.reset()
            opening = first if first is not None else client.open("GET", url, headers=headers)
            first = None
            try:
                with opening as response:
                    status = response.status_code
                    total = _expected_total(response, part, ranged)
                    if total is None and status == 206:
                        # A 206 for other bytes than asked: throw the partial file away
                        # and ask for the whole body.
                        if plain or not ranged:
                            raise RangeMismatch(
                                f"{url} answered a request without Range with 206 and "
                                f"Content-Range {response.headers.get('content-range')!r}; "
                                "the server is broken, the job is retried later",
                                url=url,
                            )
                        part.reset()
                        restarts += 1
                        resumed_from = 0
                        plain = True
                        continue
                    if ranged and status == 200:
                        part.reset()
                        restarts += 1
                        resumed_from = 0
                    if total is not None:
                        expected.append(total)
                    if total is not None and total > limit:
                        raise TooLarge(
                            f"{url} is {total} bytes, over the limit of {limit} "
                            "(download_max_bytes); raise the limit to fetch it",
                            url=url,
                        )
                    for chunk in response.iter_raw():
                        if part.size + len(chunk) > limit:
                            raise TooLarge(
                                f"{url} sent more than {limit} bytes (download_max_bytes); "
                                "raise the limit to fetch it",
                                url=url,
                            )
                        part.write(chunk)
                        received += len(chunk)
                        since_renew += len(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                        now = time.monotonic()
                        if since_renew >= RENEW_BYTES or now - last_renew >= RENEW_SECONDS:
                            part.sync()
                            renew()
                            last_renew, since_renew = now, 0
                    if total is not None and part.size != total:
                        raise _BodyEnded(f"the body ended at byte {part.size} of {total}")
                part.sync()
                return StreamOutcome(
                    sha256=part.hash.hexdigest(),
                    size=part.size,
                    resumed_from=resumed_from,
                    received=received,
                    restarts=restarts,
                    breaks=breaks,
                    status=status,
                )
            except HttpStatusError as exc:
                if exc.status == 416 and ranged and _whole(exc.content_range, part.size):
                    # If-Range matched (else the answer is a 200 with the new body) and
                    # nothing follows the bytes on disk: the partial file is the whole
                    # file, typically when its STREAM result could not be recorded.
                    part.sync()
                    return StreamOutcome(
                        sha256=part.hash.hexdigest(),
                        size=part.size,
                        resumed_from=part.size,
                        received=received,
                        restarts=restarts,
                        breaks=breaks,
                        status=exc.status,
                    )
                if exc.status == 416 and ranged:
                    restarts += 1
                    resumed_from = 0
                    plain = True
                    continue
                raise
            except (httpx.TransportError, _BodyEnded) as exc:
                part.sync()
                breaks += 1
                if breaks > config.download_max_retries:
                    raise TransferError(
                        f"{url}: the body broke off {breaks} times, last at byte "
                        f"{part.size} ({type(exc).__name__}: {exc}); the job is retried "
                        "later and resumes from the bytes on disk",
                        url=url,
                    ) from None
                # Without ranges the bytes on disk cannot be continued; start over.
                plain = not can_range
                time.sleep(min(client.backoff_base * 2.0 ** (breaks - 1), 5.0))
    except TooLarge:
        part.reset()
        raise
    except OSError:
        # Keep what reached the disk: the next attempt resumes from it.
        with contextlib.suppress(OSError):
            part.sync()
        raise
    finally:
        part.close()


def _whole(content_range: str | None, size: int) -> bool:
    """Whether a 416's ``Content-Range: bytes */N`` says the file is ``size`` bytes long."""
    if content_range is None:
        return False
    unit, _, total = content_range.strip().partition(" */")
    return unit.strip().lower() == "bytes" and total.strip().isdigit() and int(total) == size


def _expected_total(response: httpx.Response, part: _Part, ranged: bool) -> int | None:
    """Return the file's total size the response announces, or None for a ``206`` whose
    range does not start where the partial file ends (or cannot be read)."""
    if response.status_code == 206:
        parsed = parse_content_range(response.headers.get("content-range"))
        if not ranged or parsed is None or parsed[0] != part.size:
            return None
        _first, last, total = parsed
        return total if total is not None else last + 1
    length = response.headers.get("content-length")
    return int(length) if length is not None and length.strip().isdigit() else None


__all__ = ["RENEW_BYTES", "RENEW_SECONDS", "RangeMismatch", "StreamOutcome", "stream_to_part"]
