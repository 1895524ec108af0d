"""Prometheus metrics: the ledger as a whole, and each worker process's own.

- :mod:`impl.metrics.ledger`: :class:`LedgerCollector`, computed from ``store.stats()``
  at scrape time (``jobledger metrics serve``).
- :mod:`impl.metrics.worker`: :class:`WorkerMetrics`, counters and histograms fed by the
  worker's telemetry events (``jobledger worker ... --metrics-port``).
- :mod:`impl.metrics.server`: the HTTP endpoint at ``/metrics``.
- ``monitoring/``: the Grafana dashboard and the Prometheus alert rules that read them
  (``specs/010-monitoring-playbook.md`` says what each alert means and what to run).

Names follow Prometheus conventions: every family starts with ``jobledger_``, counters
end in ``_total`` and durations in ``_seconds``.
"""

from __future__ import annotations

from pathlib import Path

from impl.metrics.ledger import LedgerCollector
from impl.metrics.server import MetricsServer, serve
from impl.metrics.worker import WorkerMetrics

MONITORING = Path(__file__).with_name("monitoring")
"""The folder with ``dashboard.json`` (Grafana) and ``alerts.yml`` (Prometheus rules)."""

__all__ = ["MONITORING", "LedgerCollector", "MetricsServer", "WorkerMetrics", "serve"]
