"""The retention setting and the service that applies it on its own schedule.

``retention: 30d`` in the YAML file (or ``JOBLEDGER_RETENTION``, or ``--set
retention=...``) makes a long-running ``jobledger worker`` prune finished jobs at start
and every ``retention_interval`` seconds; :class:`impl.Reconciler` does the same between
its passes when given a :class:`impl.Retention`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import impl
from impl.config import load_config
from model import ConfigError, JobPruned, ManualClock, MemoryStore, Workflow

FLOW = Workflow(name="f", states=["A", "B"], transitions=[("A", "B")], initial="A", terminal=["B"])


def _finished(store: impl.Store, n: int) -> list[str]:
    store.register(FLOW)
    ids = store.plan_many("f", [{"n": i} for i in range(n)])
    while (lease := store.lease_next("w")) is not None:
        store.advance(lease, "B")
    return ids


def test_retention_is_read_from_yaml_environment_and_command_line(tmp_path: Path) -> None:
    path = tmp_path / "jobledger.yaml"
    path.write_text("retention: 30d\nretention_interval: 600\nretention_failed: keep\n")
    config, sources = load_config(config_file=path, env={}, overrides={})
    assert (config.retention_age, config.retention_interval) == (30 * 86400.0, 600.0)
    assert config.retention_failed == "keep"
    assert sources["retention"] == f"{path}:1"
    config, sources = load_config(
        config_file=path, env={"JOBLEDGER_RETENTION": "12h"}, overrides={}
    )
    assert (config.retention_age, sources["retention"]) == (12 * 3600.0, "JOBLEDGER_RETENTION")
    config, _ = load_config(config_file=path, env={}, overrides={"retention": "0s"})
    assert config.retention_age == 0.0
    assert load_config(config_file=None, env={}, overrides={})[0].retention_age is None


@pytest.mark.parametrize(("key", "value"), [("retention", "soon"), ("retention_failed", "maybe")])
def test_a_bad_retention_setting_names_the_key_and_the_source(
    tmp_path: Path, key: str, value: str
) -> None:
    path = tmp_path / "jobledger.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{path}:1.*{key}"):
        load_config(config_file=path, env={}, overrides={})


def test_the_service_prunes_by_age_and_only_when_due() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    ids = _finished(store, 3)
    ticks = [0.0]
    retention = impl.Retention(store, age=60.0, interval=100.0, monotonic=lambda: ticks[0])
    assert retention.due()
    assert retention.run_once().jobs == 0  # finished just now: younger than 60 s
    clock.advance(61)
    assert retention.run_if_due() is None  # the last pass was just now
    ticks[0] = 100.0
    report = retention.run_if_due()
    assert report is not None
    assert report.jobs == 3
    with pytest.raises(JobPruned):
        store.job(ids[0])


def test_keep_failed_from_the_configuration() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.register(FLOW)
    failed = store.plan("f", {"n": 1})
    store.cancel(failed, "no")
    clock.advance(10)
    config = impl.Config(retention="1s", retention_failed="keep")
    retention = impl.Retention.from_config(store, config)
    assert retention is not None
    assert retention.run_once().jobs == 0
    assert store.job(failed).state == "FAILED"
    assert impl.Retention.from_config(store, impl.Config()) is None


def test_the_reconciler_prunes_between_its_passes() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    ids = _finished(store, 2)
    clock.advance(10)
    reconciler = impl.Reconciler(
        store, interval=0.01, retention=impl.Retention(store, age=5.0, interval=3600.0)
    )
    thread = threading.Thread(target=reconciler.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while store.jobs() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        reconciler.stop()
        thread.join(10)
    assert store.jobs() == []
    with pytest.raises(JobPruned):
        store.job(ids[1])
