"""Telemetry: events reach listeners and loggers, JSON logs parse, and idle emit is free."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from impl import telemetry
from model import Event, HistoryEvent


@pytest.fixture(autouse=True)
def clean_telemetry() -> Iterator[None]:
    root = logging.getLogger(telemetry.ROOT_LOGGER)
    level, handlers = root.level, list(root.handlers)
    for listener in telemetry.listeners():
        telemetry.remove_listener(listener)
    yield
    for listener in telemetry.listeners():
        telemetry.remove_listener(listener)
    root.setLevel(level)
    root.handlers[:] = handlers


def test_listener_receives_emitted_events_until_removed() -> None:
    seen: list[object] = []
    telemetry.add_listener(seen.append)
    telemetry.emit("lease.granted", job_id="j1", token=3)
    telemetry.remove_listener(seen.append)
    telemetry.emit("lease.granted", job_id="j2", token=4)
    assert seen == [{"event": "lease.granted", "job_id": "j1", "token": 3}]


def test_history_events_reach_listeners_as_records() -> None:
    seen: list[object] = []
    telemetry.add_listener(seen.append)
    event = HistoryEvent("j1", 10.0, Event.LEASED, 1, "w", {"x": 1})
    telemetry.emit_history(event)
    assert seen == [event]


def test_a_broken_listener_does_not_stop_others_or_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[object] = []

    def broken(_event: object) -> None:
        raise RuntimeError("exporter down")

    telemetry.add_listener(broken)
    telemetry.add_listener(seen.append)
    with caplog.at_level(logging.ERROR, logger="jobledger.telemetry"):
        telemetry.emit("job.failed", job_id="j")
    assert seen == [{"event": "job.failed", "job_id": "j"}]
    assert "exporter down" in caplog.text


def test_events_are_logged_on_their_concern_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="jobledger"):
        telemetry.emit("effect.recorded", job_id="j", op="HEAD")
        telemetry.emit_history(HistoryEvent("j", 1.0, Event.EXPIRED, 2, "w"))
    names = [(r.name, getattr(r, "event", None)) for r in caplog.records]
    assert names == [
        ("jobledger.effect", "effect.recorded"),
        ("jobledger.lease", "lease.expired"),
    ]


def test_json_formatter_writes_one_parsable_object_per_line() -> None:
    stream = io.StringIO()
    telemetry.configure_logging(log_format="json", level=logging.DEBUG, stream=stream)
    telemetry.emit("job.advanced", job_id="j", detail={"from": "A", "to": "B"})
    telemetry.emit_history(HistoryEvent("j", 1.0, Event.PLANNED, 0, None))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "job.advanced"
    assert first["logger"] == "jobledger.job"
    assert first["detail"] == {"from": "A", "to": "B"}
    assert second["event"] == "job.planned"
    assert second["job_id"] == "j"


def test_configure_logging_twice_keeps_one_handler() -> None:
    stream = io.StringIO()
    telemetry.configure_logging(level=logging.DEBUG, stream=io.StringIO())
    telemetry.configure_logging(level=logging.DEBUG, stream=stream)
    telemetry.emit("cli.test")
    assert stream.getvalue().count("cli.test") == 1


class _CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def test_idle_emit_creates_no_log_record() -> None:
    """With no listener and DEBUG off, emit must not build records (it is on hot paths)."""
    root = logging.getLogger(telemetry.ROOT_LOGGER)
    handler = _CountingHandler()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for _ in range(100):
        telemetry.emit("lease.renewed", job_id="j", token=1)
        telemetry.emit_history(HistoryEvent("j", 1.0, Event.RENEWED, 1, "w"))
    assert handler.count == 0
