"""Circuit breakers as the ledger records them: one row per host and process.

A breaker is decided inside one process (``impl/download/breaker.py``): the process that
sends the requests counts their failures. The ledger only keeps what operators need to
see, written when a breaker **opens** or **closes** (never per request):
``store.record_breaker(host, worker=..., state=..., ...)`` upserts the row of
``(host, worker)``; ``store.breakers()`` lists them; ``store.forget_breakers`` removes
rows last changed before a cutoff (``jobledger prune`` calls it with its own cutoff).

Several processes may each hold a breaker for the same host, so a host can have several
rows, one per worker name (``host:pid:n``): the ledger shows what each process saw, it
does not merge them into one decision.

A row that stays ``open`` long after its ``until`` (when its probe was due) belongs to a
process that stopped asking that host: its run ended while the host was down, or it
died. :meth:`BreakerRow.stale` says so after :data:`BREAKER_STALE_SECONDS`; the row
stays (it is still the last thing known about that host) until a prune removes it.
"""

from __future__ import annotations

import enum
import math

from attrs import frozen

from model.errors import InvalidInput
from model.validate import check_int, check_seconds, check_text

BREAKER_STALE_SECONDS = 60.0
"""Seconds after an open breaker's probe was due (``until``) before its row counts as
stale: a process still asking the host records the probe's outcome well within this
(a request times out sooner), so silence this long means it stopped asking."""

BREAKER_RECENT_SECONDS = 3600.0
"""How long ``jobledger status`` keeps listing a breaker after it closed."""

BREAKER_ERROR_LIMIT = 500
"""Characters of ``last_error`` kept (an error text can quote a whole response)."""


class BreakerMove(enum.StrEnum):
    """The two transitions the ledger records."""

    OPEN = "open"
    CLOSED = "closed"


@frozen
class BreakerRow:
    """What one process last recorded about its breaker for one host.

    Attributes:
        host: ``host:port``.
        worker: the process that decided it (its worker name, ``host:pid:n``).
        state: ``"open"`` or ``"closed"``.
        failures: failures in a row when it last changed.
        last_error: the last failure seen from the host (kept when it closes).
        opened_at: when it last opened (store clock; kept when it closes).
        until: while open, when its probe is due (store clock); None when closed.
        changed_at: when this row was last written (store clock).
        opens: how often this process recorded it opening.
    """

    host: str
    worker: str
    state: BreakerMove
    failures: int
    last_error: str | None
    opened_at: float | None
    until: float | None
    changed_at: float
    opens: int

    def stale(self, now: float) -> bool:
        """True for an open row whose probe was due more than
        :data:`BREAKER_STALE_SECONDS` ago: its process stopped asking the host."""
        return (
            self.state is BreakerMove.OPEN
            and self.until is not None
            and now - self.until > BREAKER_STALE_SECONDS
        )

    def shown(self, now: float) -> bool:
        """True when ``jobledger status`` lists it: open, or closed less than
        :data:`BREAKER_RECENT_SECONDS` ago."""
        return self.state is BreakerMove.OPEN or now - self.changed_at < BREAKER_RECENT_SECONDS


@frozen
class BreakerChange:
    """A checked ``record_breaker`` call (see :func:`check_breaker`)."""

    host: str
    worker: str
    state: BreakerMove
    failures: int
    last_error: str | None
    cooldown: float | None


def check_breaker(
    host: object,
    *,
    worker: object,
    state: object,
    failures: object,
    last_error: object,
    cooldown: object,
) -> BreakerChange:
    """Check the arguments of ``record_breaker`` the same way on every backend.

    Raises:
        InvalidInput: an empty host or worker, a state other than "open" or "closed", a
            negative failure count, an open breaker without a positive ``cooldown``, or
            a closed one with a ``cooldown``.
    """
    host = check_text(host, name="breaker host")
    worker = check_text(worker, name="breaker worker")
    if not host or not worker:
        raise InvalidInput("a breaker row needs a non-empty host and worker name")
    try:
        move = BreakerMove(state)  # type: ignore[arg-type]  # checked right here
    except ValueError:
        raise InvalidInput(
            f"a breaker's recorded state must be 'open' or 'closed', got {state!r}"
        ) from None
    count = check_int(failures, name="breaker failures", minimum=0)
    error = None
    if last_error is not None:
        error = check_text(last_error, name="breaker last_error")[:BREAKER_ERROR_LIMIT]
    seconds: float | None = None
    if move is BreakerMove.OPEN:
        if cooldown is None:
            raise InvalidInput("an open breaker needs its cooldown (seconds until the probe)")
        seconds = check_seconds(cooldown, name="breaker cooldown", positive=True)
    elif cooldown is not None:
        raise InvalidInput(f"a closed breaker has no cooldown, got {cooldown!r}")
    return BreakerChange(
        host=host,
        worker=worker,
        state=move,
        failures=count,
        last_error=error,
        cooldown=seconds,
    )


def check_before(changed_before: object) -> float:
    """Check ``forget_breakers``' cutoff: a finite number of store-clock seconds."""
    if (
        isinstance(changed_before, bool)
        or not isinstance(changed_before, int | float)
        or not math.isfinite(changed_before)
    ):
        raise InvalidInput(f"changed_before must be a finite time, got {changed_before!r}")
    return float(changed_before)
