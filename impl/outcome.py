"""How a handler says "not now" without blaming the job: :class:`RetryLater`.

A handler fails a job by raising any exception: the worker records the failure and the
job spends an attempt. Some failures are not the job's fault: the disk is full, the
output directory is read-only, the host is down or asks everyone to slow down. Raising
:class:`RetryLater` tells every worker (threaded or async) to release the lease with a
delay instead, which gives the attempt back and keeps the job's recorded effects.
"""

from __future__ import annotations


class RetryLater(Exception):
    """Raised by a handler when the world is wrong, not the job: release, no attempt spent.

    Args:
        reason: what is wrong and what would fix it; kept in the job's history.
        delay: seconds until the job is eligible again; None lets the worker choose
            (its configured backoff for the first attempt).
    """

    def __init__(self, reason: str, delay: float | None = None) -> None:
        if delay is not None and not delay >= 0:
            raise ValueError(f"RetryLater delay must be >= 0 seconds, got {delay!r}")
        super().__init__(reason)
        self.reason = reason
        self.delay = delay

    def __str__(self) -> str:
        after = "" if self.delay is None else f" (retry in {self.delay:g} s)"
        return f"{self.reason}{after}"
