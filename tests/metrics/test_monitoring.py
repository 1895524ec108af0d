"""The shipped alert rules and Grafana dashboard read metrics that really exist.

Every ``jobledger_*`` name in an alert expression or a dashboard query must be a sample
name of a real scrape of both endpoints (the ledger's and a worker's, after the worker
did some work, so the labelled histograms have samples). The rules are also checked by
``promtool`` when it is installed, and every alert's runbook must be a section of the
playbook (specs/010-monitoring-playbook.md).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

import impl
from impl.metrics import MONITORING, LedgerCollector, WorkerMetrics, serve
from impl.sqlite.store import SqliteStore
from model import Workflow

from .scrape import names, scrape

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = ROOT / "specs" / "010-monitoring-playbook.md"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "dashboard.json"
METRIC = re.compile(r"\bjobledger_[a-z0-9_]+")
FLOW = Workflow("flow", ["A", "B"], [("A", "B")], initial="A", terminal=["B"])


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every sample name of a real scrape of the ledger's and a worker's endpoints."""
    db = tmp_path_factory.mktemp("monitoring") / "j.sqlite"
    ledger_registry, worker_registry = CollectorRegistry(), CollectorRegistry()
    counts = WorkerMetrics(worker_registry)
    counts.install()
    with SqliteStore(db) as store:
        ledger_registry.register(LedgerCollector(store))
        ledger = serve(ledger_registry, port=0)
        worker = serve(worker_registry, port=0)
        try:
            store.register(FLOW)
            store.plan("flow", {"n": 1})

            def handler(ctx: impl.JobContext) -> None:
                ctx.effect("work", lambda e: None)
                ctx.advance("B")

            impl.Worker(store, {"flow": handler}).run(until_idle=True)
            yield names(scrape(ledger.url)) | names(scrape(worker.url))
        finally:
            counts.uninstall()
            ledger.close()
            worker.close()


def _alerts() -> list[dict[str, object]]:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in rules["groups"] for rule in group["rules"]]


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [
        str(target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [str(var["definition"]) for var in dashboard["templating"]["list"]]
    return queries


def test_every_alert_expression_names_metrics_that_exist(scraped: set[str]) -> None:
    alerts = _alerts()
    assert {a["alert"] for a in alerts} >= {
        "JobledgerStuckJobs",
        "JobledgerInDoubtEffectsGrowing",
        "JobledgerQueueLag",
        "JobledgerLeaseLosses",
        "JobledgerFailureRate",
    }
    for alert in alerts:
        used = set(METRIC.findall(str(alert["expr"])))
        assert used, f"{alert['alert']} reads no jobledger metric"
        assert used <= scraped, f"{alert['alert']} names metrics no endpoint has: {used - scraped}"


def test_every_dashboard_query_names_metrics_that_exist(scraped: set[str]) -> None:
    queries = _dashboard_queries()
    assert len(queries) >= 10
    for query in queries:
        used = set(METRIC.findall(query))
        assert used, f"a dashboard query reads no jobledger metric: {query}"
        assert used <= scraped, f"{query} names metrics no endpoint has: {used - scraped}"


def test_every_alert_links_to_its_section_of_the_playbook() -> None:
    headings = {
        line.removeprefix("### ").strip().lower()
        for line in PLAYBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("### ")
    }
    for alert in _alerts():
        annotations = alert["annotations"]
        assert isinstance(annotations, dict)
        page, _, anchor = str(annotations["runbook"]).partition("#")
        assert (ROOT / page) == PLAYBOOK
        assert anchor == str(alert["alert"]).lower() in headings, alert["alert"]


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (on Debian: apt-get install prometheus); the rules "
            "were still parsed as YAML and their metric names checked against a real scrape "
            "by test_every_alert_expression_names_metrics_that_exist"
        )
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_the_alerts_fire_when_their_condition_has_held_and_not_before() -> None:
    """promtool's unit tests (tests/metrics/alerts_test.yml): thresholds, `for` clauses
    and the annotations an on-call engineer reads."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (on Debian: apt-get install prometheus), so the "
            "alerts' behaviour over time is not simulated; their expressions were still "
            "checked against a real scrape"
        )
    done = subprocess.run(
        [promtool, "test", "rules", str(Path(__file__).with_name("alerts_test.yml"))],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
