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

Importing this package does not import ``prometheus_client`` (about 0.1 s): the names
below load their module on first use, so a CLI command that serves no metrics does not
pay for them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from impl.metrics.ledger import LedgerCollector
    from impl.metrics.server import MetricsServer, serve
    from impl.metrics.worker import WorkerMetrics

MONITORING = Path(__file__).with_name("monitoring")
"""The folder with ``dashboard.json`` (Grafana) and ``alerts.yml`` (Prometheus rules)."""

DEFAULT_HOST = "127.0.0.1"
"""Where an endpoint listens unless told otherwise: metrics name the ledger's workflows
and states, which need not be public."""

_HOMES = {
    "LedgerCollector": "impl.metrics.ledger",
    "MetricsServer": "impl.metrics.server",
    "serve": "impl.metrics.server",
    "WorkerMetrics": "impl.metrics.worker",
}

__all__ = [
    "DEFAULT_HOST",
    "MONITORING",
    "LedgerCollector",
    "MetricsServer",
    "WorkerMetrics",
    "serve",
]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'impl.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
