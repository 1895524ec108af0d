"""``jobledger metrics serve``: the ledger's metrics for Prometheus, at ``/metrics``.

A thin command: it opens the store, registers :class:`impl.metrics.LedgerCollector`
(which reads ``store.stats()`` at every scrape) beside the process's own metrics, and
serves them until SIGTERM (exit 0) or Ctrl-C (exit 130).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

from impl.cli.session import Session, pass_session
from impl.metrics import DEFAULT_HOST

PORT = click.IntRange(min=0, max=65535)


@click.group()
def metrics() -> None:
    """Expose the ledger's metrics to Prometheus.

    The alerts and the dashboard that read them, and what to do when an alert fires:
    specs/010-monitoring-playbook.md."""


@metrics.command("serve")
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    metavar="ADDRESS",
    help="Address to listen on (0.0.0.0 exposes the metrics to the network).",
)
@click.option(
    "--port", type=PORT, required=True, metavar="P", help="Port to listen on (0: a free one)."
)
@pass_session
def serve_command(session: Session, *, host: str, port: int) -> None:
    """Serve the ledger's metrics at http://HOST:P/metrics until stopped.

    Jobs by kind and state (one gauge family, labels kind and state), live and expired
    leases, in-doubt effects, failed jobs and the queue lag, all read from the ledger
    at every scrape. SIGTERM stops it (exit 0)."""
    # Imported here: prometheus_client costs every other command 0.1 s at start-up.
    from prometheus_client import CollectorRegistry, ProcessCollector  # noqa: PLC0415

    from impl.metrics.ledger import LedgerCollector  # noqa: PLC0415
    from impl.metrics.server import serve  # noqa: PLC0415

    with session.store() as store:
        registry = CollectorRegistry()
        registry.register(LedgerCollector(store))
        ProcessCollector(registry=registry)
        server = serve(registry, host=host, port=port)
        try:
            click.echo(f"serving the ledger's metrics at {server.url} (Ctrl-C to stop)")
            wait_for_termination()
        finally:
            server.close()


def wait_for_termination() -> None:
    """Block until SIGTERM (Ctrl-C raises KeyboardInterrupt, as everywhere in the CLI)."""
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(metrics)
