"""Telemetry: structured events through :mod:`logging`, and listeners that forward them.

Every step that a job's history records is also an *event* here, named
``"<concern>.<what>"`` (``"lease.leased"``, ``"effect.recorded"``, ``"job.failed"``) and
logged on the concern's logger (``jobledger.lease``, ``jobledger.effect``,
``jobledger.job``, ``jobledger.reconcile``, ``jobledger.cli``) at DEBUG level, with its
fields attached to the log record as ``record.event`` and ``record.fields``.

Applications forward events without patching anything::

    from impl import telemetry

    def to_metrics(event):            # a HistoryEvent, or a dict for other events
        ...

    telemetry.add_listener(to_metrics)

:func:`emit` costs one truthiness check and one cached level check when no listener is
registered and DEBUG is off, so stores and workers call it on their hot paths.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import IO

import attrs

from model.record import Event, HistoryEvent

ROOT_LOGGER = "jobledger"
CONCERNS = (
    "lease",
    "effect",
    "job",
    "reconcile",
    "worker",
    "download",
    "cli",
    "storage",
    "telemetry",
)
"""The concerns that have a logger of their own, ``jobledger.<concern>``."""

TelemetryEvent = HistoryEvent | dict[str, object]
Listener = Callable[[TelemetryEvent], None]

_EVENT_CONCERN: dict[Event, str] = {
    Event.PLANNED: "job",
    Event.LEASED: "lease",
    Event.RENEWED: "lease",
    Event.RELEASED: "lease",
    Event.EXPIRED: "lease",
    Event.ADVANCED: "job",
    Event.EFFECT_STARTED: "effect",
    Event.EFFECT_RECORDED: "effect",
    Event.EFFECT_IN_DOUBT: "effect",
    Event.FAILED: "job",
    Event.CANCELLED: "job",
    Event.RETRIED: "job",
}

_LOGGERS: dict[str, logging.Logger] = {
    concern: logging.getLogger(f"{ROOT_LOGGER}.{concern}") for concern in CONCERNS
}
# The loggers history entries go to (see _EVENT_CONCERN).
_HISTORY_LOGGERS = (_LOGGERS["job"], _LOGGERS["lease"], _LOGGERS["effect"])
_listeners: tuple[Listener, ...] = ()
_listeners_lock = threading.Lock()


def logger(concern: str) -> logging.Logger:
    """Return the logger of ``concern`` (``jobledger.<concern>``)."""
    found = _LOGGERS.get(concern)
    if found is None:
        found = _LOGGERS[concern] = logging.getLogger(f"{ROOT_LOGGER}.{concern}")
    return found


def add_listener(listener: Listener) -> None:
    """Call ``listener`` with every event from now on, in the thread that emits it.

    A listener receives a :class:`~model.HistoryEvent` for history steps (from
    :func:`emit_history`) and a dict with at least ``"event"`` for anything else. It
    must be quick and must not raise; an exception is logged and otherwise ignored so a
    broken exporter cannot fail a job.
    """
    global _listeners  # noqa: PLW0603 - an immutable tuple swapped under a lock keeps emit lock-free
    with _listeners_lock:
        _listeners = (*_listeners, listener)


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener``; removing one that is not registered does nothing."""
    global _listeners  # noqa: PLW0603 - see add_listener
    with _listeners_lock:
        remaining = list(_listeners)
        if listener in remaining:
            remaining.remove(listener)
        _listeners = tuple(remaining)


def history_wanted() -> bool:
    """True if history entries go anywhere: a listener, or a history logger at DEBUG.

    When False, a store need not even turn the entries it wrote into events.
    """
    if _listeners:
        return True
    job, lease, effect = _HISTORY_LOGGERS
    return (
        job.isEnabledFor(logging.DEBUG)
        or lease.isEnabledFor(logging.DEBUG)
        or effect.isEnabledFor(logging.DEBUG)
    )


def listeners() -> tuple[Listener, ...]:
    """Return the registered listeners, in registration order."""
    return _listeners


def _notify(event: TelemetryEvent) -> None:
    for listener in _listeners:
        try:
            listener(event)
        except Exception:
            _LOGGERS["telemetry"].exception("telemetry listener %r raised", listener)


def emit(event_name: str, /, **fields: object) -> None:
    """Report the event ``event_name`` (``"<concern>.<what>"``) with ``fields``.

    The event is logged at DEBUG on ``jobledger.<concern>`` and passed, as a dict
    ``{"event": event_name, **fields}``, to every listener.
    """
    concern = event_name.partition(".")[0]
    log = _LOGGERS.get(concern) or logger(concern)
    if not _listeners and not log.isEnabledFor(logging.DEBUG):
        return
    payload: dict[str, object] = {"event": event_name, **fields}
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "%s %s",
            event_name,
            " ".join(f"{k}={v}" for k, v in fields.items()),
            extra={"event": event_name, "fields": fields},
        )
    if _listeners:
        _notify(payload)


def emit_history(event: HistoryEvent) -> None:
    """Report one history entry: logged on its concern's logger, passed as is to listeners."""
    concern = _EVENT_CONCERN.get(event.event, "job")
    log = _LOGGERS[concern]
    if not _listeners and not log.isEnabledFor(logging.DEBUG):
        return
    if log.isEnabledFor(logging.DEBUG):
        name = f"{concern}.{event.event.value}"
        fields = history_fields(event)
        log.debug(
            "%s job=%s token=%s worker=%s %s",
            name,
            event.job_id,
            event.token,
            event.worker,
            " ".join(f"{k}={v}" for k, v in event.detail.items()),
            extra={"event": name, "fields": fields},
        )
    if _listeners:
        _notify(event)


def history_fields(event: HistoryEvent) -> dict[str, object]:
    """Return a history entry as a flat, JSON-ready dict."""
    return {
        "job_id": event.job_id,
        "at": event.at,
        "event": event.event.value,
        "token": event.token,
        "worker": event.worker,
        "detail": dict(event.detail),
    }


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object per line.

    Keys: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, then ``event``
    and the event's fields when the record came from :func:`emit`, and ``exc_info``
    text when an exception is attached.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                out.setdefault(str(key), value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=_json_default, ensure_ascii=False)


def _json_default(value: object) -> object:
    if attrs.has(type(value)):
        return attrs.asdict(value)  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(
    *, log_format: str = "text", level: int = logging.WARNING, stream: IO[str] | None = None
) -> logging.Handler:
    """Send ``jobledger.*`` records at ``level`` and above to ``stream`` (default stderr).

    ``log_format`` is ``"text"`` or ``"json"`` (one object per line, see
    :class:`JsonFormatter`), as ``Config.log_format`` says. Calling it again replaces
    the handler it installed before, so it is safe to call once per command.

    Returns:
        The handler installed on the ``jobledger`` logger.
    """
    root = logging.getLogger(ROOT_LOGGER)
    for handler in list(root.handlers):
        if getattr(handler, "_jobledger_handler", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler._jobledger_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler
