"""``jobledger worker MODULE:ATTR``: run a :class:`impl.Worker` over the user's handlers.

``MODULE:ATTR`` names either a mapping of job kind to handler, or a callable that returns
one (called with no arguments, so it can open clients before the worker starts). The
current directory is importable, as with ``python -m``.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import click

from impl.cli import exit as exits
from impl.cli.session import Session, pass_session
from impl.metrics import DEFAULT_HOST
from impl.retention import Retention
from impl.worker import Worker
from model.store import Store

Handlers = dict[str, Callable[..., object]]


def load_handlers(spec: str) -> Handlers:
    """Import ``MODULE:ATTR`` and return the handlers it names.

    Raises:
        click.BadParameter: the spec is malformed, the module or attribute is missing,
            or it does not give a mapping of kind names to callables.
    """

    def bad(message: str) -> click.BadParameter:
        return click.BadParameter(message, param_hint="MODULE:ATTR")

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise bad(f"{spec!r} is not MODULE:ATTR (for example myapp.jobs:handlers)")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise bad(f"cannot import module {module_name!r}: {exc}") from exc
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise bad(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(target, Mapping) and callable(target):
        target = target()
    if not isinstance(target, Mapping) or not target:
        raise bad(
            f"{spec} must be a non-empty dict of job kind to handler, or a callable "
            f"returning one; got {type(target).__name__}"
        )
    handlers: Handlers = {}
    for kind, handler in target.items():
        if not isinstance(kind, str) or not callable(handler):
            raise bad(f"{spec}: entry {kind!r} must map a kind name (str) to a callable")
        handlers[kind] = handler
    return handlers


@click.command()
@click.argument("handlers_spec", metavar="MODULE:ATTR")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Jobs run at the same time (threads in this process).",
)
@click.option("--name", metavar="NAME", help="Worker name recorded on its leases.")
@click.option(
    "--until-idle", is_flag=True, help="Stop when no job is eligible instead of waiting for more."
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    metavar="P",
    help="Serve this process's worker metrics for Prometheus at http://HOST:P/metrics "
    "(0: a free port, printed on stderr).",
)
@click.option(
    "--metrics-host",
    default=DEFAULT_HOST,
    show_default=True,
    metavar="ADDRESS",
    help="Address the metrics endpoint listens on.",
)
@pass_session
def worker(
    session: Session,
    *,
    handlers_spec: str,
    concurrency: int,
    name: str | None,
    until_idle: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run a worker over the handlers MODULE:ATTR names.

    MODULE:ATTR is a dict of job kind to handler, or a callable returning one. The
    worker runs until SIGTERM or Ctrl-C, which stop it after the current effect and
    release its lease (exit 130). With --until-idle it stops when no job is eligible
    and exits 1 if jobs failed during the run. With `retention` set in the configuration
    (e.g. `retention: 30d`), it also prunes finished jobs at start and every
    `retention_interval` seconds (see `jobledger prune`)."""
    handlers = load_handlers(handlers_spec)
    with session.store(create=True) as store, _metrics(metrics_host, metrics_port):
        failed_before = _failed_ids(store, handlers)
        runner = Worker(store, handlers, name=name, concurrency=concurrency)
        retention = Retention.from_config(store, session.config)
        pruner = None
        if retention is not None:
            # The configured retention (``retention: 30d``) runs beside the jobs.
            pruner = threading.Thread(target=retention.run, name="jobledger-retention")
            pruner.start()
        try:
            report = runner.run(until_idle=until_idle)
        finally:
            if retention is not None and pruner is not None:
                retention.stop()
                pruner.join()
        newly_failed = _failed_ids(store, handlers) - failed_before
    click.echo(
        f"worker {runner.name}: {report.jobs} job(s) leased, {report.finished} finished, "
        f"{report.released} released, {report.failed} failed attempt(s), {report.lost} "
        "lease(s) lost"
    )
    if runner.stopping:
        click.echo("stopped by a signal; leases were released", err=True)
        raise click.exceptions.Exit(exits.INTERRUPTED)
    if newly_failed:
        click.echo(
            f"{len(newly_failed)} job(s) failed; see `jobledger jobs --state FAILED`", err=True
        )
        raise click.exceptions.Exit(exits.FAILED_JOBS)


@contextmanager
def _metrics(host: str, port: int | None) -> Iterator[None]:
    """Serve this process's worker metrics while the worker runs (when a port is given).

    Raises:
        InvalidInput: the port is taken (before the worker leases anything).
    """
    if port is None:
        yield
        return
    # Imported here: prometheus_client costs every other command 0.1 s at start-up.
    from prometheus_client import CollectorRegistry, ProcessCollector  # noqa: PLC0415

    from impl.metrics.server import serve  # noqa: PLC0415
    from impl.metrics.worker import WorkerMetrics  # noqa: PLC0415

    registry = CollectorRegistry()
    counts = WorkerMetrics(registry)
    ProcessCollector(registry=registry)
    server = serve(registry, host=host, port=port)
    counts.install()
    click.echo(f"worker metrics at {server.url}", err=True)
    try:
        yield
    finally:
        counts.uninstall()
        server.close()


def _failed_ids(store: Store, handlers: Handlers) -> set[str]:
    out: set[str] = set()
    for kind in handlers:
        workflow = store.workflow(kind)
        out.update(job.job_id for job in store.jobs(state=workflow.failed, kind=kind))
    return out


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(worker)
