"""The HTTP client of the download pipeline: httpx with the limits a polite crawler keeps.

* connect and read timeouts (``download_connect_timeout``, ``download_read_timeout``);
* at most ``download_max_redirects`` redirects (a loop ends as :class:`TooManyRedirects`);
* retries of 429, 5xx and connection errors, up to ``download_max_retries`` more
  attempts, with exponential backoff that honours ``Retry-After`` (capped at
  :data:`RETRY_AFTER_CAP` seconds so a hostile server cannot park a worker); a 429 (or
  503 with ``Retry-After``) pauses the whole host, not just the one request;
* per host (``host.py``): a circuit breaker (``download_breaker_failures``,
  ``download_breaker_cooldown``) and a request rate (``download_rate_per_host``);
* TLS verification always on; a clear ``User-Agent`` (``download_user_agent``);
* at most ``download_per_host`` requests in flight per ``host:port`` *in this process*
  (one semaphore per host, shared by every worker thread of the process).

Only the opening of a response is retried here; a body that breaks off mid-way is the
streaming step's business, because only it knows how many bytes are safely on disk.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from types import TracebackType

import httpx
from attrs import frozen

from impl.download.errors import (
    DownloadError,
    HttpStatusError,
    TooLarge,
    TooManyRedirects,
    TransferError,
)
from impl.download.host import HostGuard
from impl.download.url import host_key
from model.config import Config
from model.record import JSON

RETRY_AFTER_CAP = 30.0
"""Longest ``Retry-After`` wait honoured, in seconds."""
BACKOFF_BASE = 0.5
"""First retry delay in seconds when the server gives no ``Retry-After``; doubles per retry."""
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@frozen
class HeadInfo:
    """What a ``HEAD`` request learned about an artifact (the ``HEAD`` effect's result)."""

    status: int
    final_url: str
    length: int | None
    content_type: str | None
    etag: str | None
    last_modified: str | None
    accept_ranges: bool

    def validator(self) -> str | None:
        """Return the strong validator usable in ``If-Range``: a strong ETag, else
        Last-Modified, else None (then a partial file cannot be resumed safely)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def to_json(self) -> dict[str, JSON]:
        """Return the JSON form recorded as the effect's result."""
        return {
            "status": self.status,
            "final_url": self.final_url,
            "length": self.length,
            "content_type": self.content_type,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "accept_ranges": self.accept_ranges,
        }

    @classmethod
    def from_json(cls, data: JSON) -> HeadInfo:
        """Rebuild from :meth:`to_json` output (a replayed effect result)."""
        assert isinstance(data, dict)
        length = data.get("length")
        return cls(
            status=int(str(data["status"])),
            final_url=str(data["final_url"]),
            length=length if isinstance(length, int) else None,
            content_type=_opt_str(data.get("content_type")),
            etag=_opt_str(data.get("etag")),
            last_modified=_opt_str(data.get("last_modified")),
            accept_ranges=bool(data.get("accept_ranges")),
        )


def _opt_str(value: JSON) -> str | None:
    return value if isinstance(value, str) else None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return the delay a ``Retry-After`` header asks for, in seconds, capped; None if absent
    or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return min(float(text), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return min(max(when.timestamp() - current, 0.0), RETRY_AFTER_CAP)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """Return ``(first, last, total)`` of a ``Content-Range: bytes a-b/n`` header, or None."""
    if not value:
        return None
    match = _CONTENT_RANGE.match(value)
    if match is None:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


class HttpClient:
    """A thread-safe HTTP client enforcing the configured limits.

    Args:
        config: the ``download_*`` settings.
        backoff_base: first retry delay in seconds (doubles per retry).
        sleep: how to wait between retries (tests may shorten it).
        transport: an httpx transport to use instead of the network (for embedding).
        per_host: requests in flight per host; default ``download_per_host`` (or
            :data:`model.config.PER_HOST_DEFAULT` when that follows ``--workers``).
    """

    def __init__(
        self,
        config: Config,
        *,
        backoff_base: float = BACKOFF_BASE,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
        per_host: int | None = None,
    ) -> None:
        self.config = config
        self.backoff_base = backoff_base
        self._sleep = sleep
        self._client = httpx.Client(
            timeout=httpx.Timeout(
                connect=config.download_connect_timeout,
                read=config.download_read_timeout,
                write=config.download_read_timeout,
                pool=config.download_connect_timeout,
            ),
            follow_redirects=True,
            max_redirects=config.download_max_redirects,
            verify=True,
            headers={"User-Agent": config.download_user_agent},
            transport=transport,
        )
        self.hosts = HostGuard(
            per_host=per_host if per_host is not None else config.per_host_limit(),
            rate=config.download_rate_per_host,
            threshold=config.download_breaker_failures,
            cooldown=config.download_breaker_cooldown,
            patience=config.download_host_patience,
            sleep=sleep,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def _delay(self, retry: int, response: httpx.Response | None) -> float:
        asked = parse_retry_after(response.headers.get("retry-after")) if response else None
        if asked is not None:
            return asked
        return float(min(self.backoff_base * 2.0 ** (retry - 1), RETRY_AFTER_CAP))

    @contextmanager
    def open(
        self, method: str, url: str, *, headers: dict[str, str] | None = None
    ) -> Iterator[httpx.Response]:
        """Send a request and yield the streaming response once it is a success (< 400).

        The host's slot is held while the caller reads the body. 5xx and connection
        errors are retried with backoff and counted by the host's breaker; 429 (and 503
        with ``Retry-After``) pause the whole host for the time asked; other statuses
        >= 400 are not retried.

        Raises:
            HostDeferred: the host's breaker is open, or the server keeps asking to slow
                down: not the job's fault, try later.
            HttpStatusError: a status >= 400 (retryable for 5xx) after retries.
            TransferError: connection errors and timeouts after retries.
            TooManyRedirects: a redirect loop or a chain over the limit.
        """
        host = host_key(url)
        retries = self.config.download_max_retries
        for attempt in range(1, retries + 2):
            last = attempt == retries + 1
            probe = self.hosts.admit(host, url)
            ok: bool | None = None  # the host answered (True), failed (False), or unknown
            error = ""
            delay = 0.0
            failure: DownloadError | None = None
            try:
                try:
                    request = self._client.build_request(method, url, headers=headers)
                    response = self._client.send(request, stream=True)
                except httpx.TooManyRedirects as exc:
                    ok = True  # the host answered; the URL is what loops
                    raise TooManyRedirects(
                        f"{method} {url} was redirected more than "
                        f"{self.config.download_max_redirects} times ({exc}); the URL loops "
                        "or the chain is too long: fix the URL or raise "
                        "download_max_redirects",
                        url=url,
                    ) from None
                except httpx.TransportError as exc:
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                    delay = self._delay(attempt, None)
                    if last:
                        failure = TransferError(
                            f"{method} {url} failed after {attempt} attempt(s): {error}; "
                            "check the network and the server",
                            url=url,
                        )
                else:
                    status = response.status_code
                    ok = status < 500
                    error = "" if ok else f"HTTP {status}"
                    if status < 400:
                        try:
                            yield response
                        finally:
                            response.close()
                        return
                    response.close()
                    failure, delay = self._refused(
                        host, url, method=method, status=status, response=response, attempt=attempt
                    )
                    if failure is None and last:
                        failure = HttpStatusError(url, status, attempts=attempt, method=method)
            finally:
                self.hosts.done(host, probe=probe, ok=ok, error=error)
            if failure is not None:
                if isinstance(failure, TransferError | HttpStatusError) and failure.retryable:
                    # Once the host's breaker is open, the host failed, not this job.
                    self.hosts.check(host, url)
                raise failure
            self._sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def _refused(
        self,
        host: str,
        url: str,
        *,
        method: str,
        status: int,
        response: httpx.Response,
        attempt: int,
    ) -> tuple[DownloadError | None, float]:
        """Decide what an answer >= 400 means: (the error to raise now, or None to try
        again after the returned delay in seconds)."""
        asked = parse_retry_after(response.headers.get("retry-after"))
        if status == 429 or (status == 503 and asked is not None):
            # The server speaks for the host: every request to it waits, not just this.
            wait = asked if asked is not None else self._delay(attempt, None)
            self.hosts.pause(host, wait, f"the server answered {status} and asked to wait")
            if attempt > self.config.download_max_retries:
                # Still asked to wait: the host's state, not this job's fault.
                reason = f"the server still answers {status} (Retry-After) after {attempt} tries"
                return self.hosts.defer(host, wait, reason, url=url), 0.0
            return None, 0.0
        if status < 500:
            error = HttpStatusError(
                url,
                status,
                attempts=attempt,
                method=method,
                content_range=response.headers.get("content-range"),
            )
            return error, 0.0
        return None, self._delay(attempt, response)

    def head(self, url: str) -> HeadInfo:
        """Return what the server says about ``url``, following redirects.

        A server that refuses ``HEAD`` (405, 501) is asked with a ``GET`` whose body is
        not read.

        Raises:
            DownloadError: (a subclass) as :meth:`open` does, and :class:`TooLarge` when
                the announced length exceeds ``download_max_bytes``.
        """
        try:
            info = self._head("HEAD", url)
        except HttpStatusError as exc:
            if exc.status not in (405, 501):
                raise
            info = self._head("GET", url)
        self._check_length(url, info)
        return info

    def head_by_get(self, url: str) -> tuple[HeadInfo, OpenResponse | None]:
        """Ask ``url`` with the ``GET`` that carries its body; return what :meth:`head`
        would (read from the GET's status and headers) and the response, still open, for
        the streaming step to read (issue 15: one request per fresh file, not two).

        The GET is the streaming step's first request (``Accept-Encoding: identity``, no
        ``Range``), opened by :meth:`open`, so its errors, retries, host pauses and
        breakers are :meth:`head`'s. Only a ``200`` can serve as both: for any other
        success the response is closed and the answer comes from :meth:`head` as before
        (the response is then None, and the streaming step makes its own request).
        The caller must close the response (:meth:`OpenResponse.close`) on every path.

        Raises:
            DownloadError: (a subclass) as :meth:`head` does; the response is closed.
        """
        opened = OpenResponse(self.open("GET", url, headers=dict(BODY_HEADERS)))
        try:
            response = opened.response
            if response.status_code != 200:
                # A 206 to a request without Range (or another odd success) does not
                # describe the whole artifact: ask as before, and let the stream judge it.
                opened.close()
                return self.head(url), None
            info = _head_info(response)
            self._check_length(url, info)
        except BaseException:
            opened.close()
            raise
        return info, opened

    def _check_length(self, url: str, info: HeadInfo) -> None:
        limit = self.config.download_max_bytes
        if info.length is not None and info.length > limit:
            raise TooLarge(
                f"{url} announces {info.length} bytes, over the limit of {limit} "
                "(download_max_bytes); raise the limit to fetch it",
                url=url,
            )

    def _head(self, method: str, url: str) -> HeadInfo:
        with self.open(method, url) as response:
            return _head_info(response)


BODY_HEADERS = {"Accept-Encoding": "identity"}
"""Headers of every request for an artifact's bytes: they are written as they come."""


def _head_info(response: httpx.Response) -> HeadInfo:
    """What the status and headers of ``response`` say about the artifact."""
    headers = response.headers
    ranges = headers.get("accept-ranges", "").lower()
    return HeadInfo(
        status=response.status_code,
        final_url=str(response.url),
        length=_content_length(response),
        content_type=headers.get("content-type"),
        etag=headers.get("etag"),
        last_modified=headers.get("last-modified"),
        accept_ranges="bytes" in ranges,
    )


class OpenResponse:
    """A response opened by one step of the workflow and read by a later one.

    It holds what :meth:`HttpClient.open` holds (the host's slot, the connection) until
    it is used as a context manager (``with opened as response:``, which behaves as
    ``with client.open(...) as response:`` from then on) or :meth:`close` d, whichever
    comes first; closing again does nothing.
    """

    def __init__(self, opening: AbstractContextManager[httpx.Response]) -> None:
        self._stack = ExitStack()
        self.response = self._stack.enter_context(opening)

    def __enter__(self) -> httpx.Response:
        return self.response

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return bool(self._stack.__exit__(kind, exc, tb))

    def close(self) -> None:
        """Close the response and give its host slot back (idempotent)."""
        self._stack.close()


__all__ = [
    "BACKOFF_BASE",
    "RETRY_AFTER_CAP",
    "DownloadError",
    "HeadInfo",
    "HttpClient",
    "OpenResponse",
    "parse_content_range",
    "parse_retry_after",
]
