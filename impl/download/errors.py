"""The download pipeline's errors, as a branch of jobledger's one hierarchy.

::

    JobledgerError
    ├── InvalidInput
    │   └── ManifestError           a manifest line that cannot be planned (file, line)
    └── DownloadError               a transfer that did not produce the artifact
        ├── HttpStatusError         an HTTP status that is not success (retryable: 429, 5xx)
        ├── TransferError           connection, timeout, truncated body (retryable)
        ├── TooManyRedirects        a redirect loop or chain longer than the limit
        ├── TooLarge                the body exceeds ``download_max_bytes``
        ├── RangeMismatch           the server answered a range with other bytes (retryable)
        ├── ChecksumMismatch        the bytes do not hash to the manifest's ``sha256``
        └── ArtifactMissing         bytes recorded as streamed are gone from disk

``retryable`` tells the pipeline whether another attempt (after the ledger's backoff) can
help; a non-retryable error moves the job into ``FAILED`` at once.
"""

from __future__ import annotations

from model.errors import InvalidInput, JobledgerError


class ManifestError(InvalidInput):
    """A manifest line that is not a valid download entry.

    The message names the file and the 1-based line number, so the user can fix it.
    """

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(
            f"{path}:{line}: {reason}; fix or remove this line (or pass skip_invalid / "
            "--skip-invalid to plan the other lines)"
        )
        self.path = path
        self.line = line
        self.reason = reason


class DownloadError(JobledgerError):
    """A download step failed; ``retryable`` says whether trying again can help."""

    retryable: bool = True

    def __init__(self, message: str, *, url: str = "", retryable: bool | None = None) -> None:
        super().__init__(message)
        self.url = url
        if retryable is not None:
            self.retryable = retryable


class HttpStatusError(DownloadError):
    """The server answered with a status that is not a success."""

    def __init__(
        self,
        url: str,
        status: int,
        *,
        attempts: int = 1,
        method: str = "GET",
        content_range: str | None = None,
    ) -> None:
        retryable = status == 429 or status >= 500
        hint = (
            "the server may recover; the job is retried with backoff"
            if retryable
            else "check the URL in the manifest; the job is not retried automatically "
            "(use `jobledger retry` once it is fixed)"
        )
        super().__init__(
            f"{method} {url} answered HTTP {status} after {attempts} attempt(s); {hint}",
            url=url,
            retryable=retryable,
        )
        self.status = status
        # A 416's "bytes */N" says how long the representation is: a resume whose bytes
        # on disk already number N is complete, not broken.
        self.content_range = content_range


class TransferError(DownloadError):
    """The connection failed, timed out or closed before the whole body arrived."""

    retryable = True


class TooManyRedirects(DownloadError):
    """Redirects looped or exceeded ``download_max_redirects``."""

    retryable = False


class TooLarge(DownloadError):
    """The body is larger than ``download_max_bytes``."""

    retryable = False


class RangeMismatch(DownloadError):
    """A ranged answer did not carry the bytes that were asked for."""

    retryable = True


class ChecksumMismatch(DownloadError):
    """The downloaded bytes do not hash to the expected SHA-256."""

    retryable = False


class ArtifactMissing(DownloadError):
    """A file the ledger says was written is not on disk (or has other bytes)."""

    retryable = False
