"""``jobledger worker MODULE:ATTR``: run a :class:`impl.Worker` over the user's handlers.

``MODULE:ATTR`` names either a mapping of job kind to handler, or a callable that returns
one (called with no arguments, so it can open clients before the worker starts). The
current directory is importable, as with ``python -m``. Handlers that are all ``async def``
run in an :class:`impl.aio.AsyncWorker` instead: ``--concurrency`` tasks on one event
loop, over ``impl.aio``'s store.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import click

from impl.aio.store import POSTGRES_THREADS, AsyncStore
from impl.aio.worker import AsyncHandler, AsyncWorker
from impl.cli import exit as exits
from impl.cli.session import Session, pass_session
from impl.metrics import DEFAULT_HOST
from impl.retention import Retention
from impl.worker import RunReport, Worker
from model.effectstep import SteppedStore
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
    help="Jobs run at the same time (threads in this process; tasks on one event loop "
    "when the handlers are async def).",
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
    and exits 1 if jobs failed during the run. Handlers that are all `async def` run as
    tasks on one event loop (impl.aio.AsyncWorker). With `retention` set in the
    configuration (e.g. `retention: 30d`), it also prunes finished jobs at start and every
    `retention_interval` seconds (see `jobledger prune`)."""
    handlers = load_handlers(handlers_spec)
    run_async = _all_async(handlers_spec, handlers)
    with session.store(create=True) as store, _metrics(metrics_host, metrics_port):
        failed_before = _failed_ids(store, handlers)
        runner: Worker | AsyncWorker | None = None
        if not run_async:
            runner = Worker(store, handlers, name=name, concurrency=concurrency)
        retention = Retention.from_config(store, session.config)
        pruner = None
        if retention is not None:
            # The configured retention (``retention: 30d``) runs beside the jobs.
            pruner = threading.Thread(target=retention.run, name="jobledger-retention")
            pruner.start()
        try:
            if isinstance(runner, Worker):
                report = runner.run(until_idle=until_idle)
            else:
                runner, report = asyncio.run(
                    _run_async(session, handlers, name, concurrency, until_idle=until_idle)
                )
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


def _is_async(handler: Callable[..., object]) -> bool:
    """Whether calling ``handler`` makes a coroutine (``async def``, or such a __call__)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004
    )


def _all_async(spec: str, handlers: Handlers) -> bool:
    """True when every handler is ``async def``, False when none is.

    Raises:
        click.BadParameter: some are and some are not (one worker runs one kind).
    """
    kinds = {kind for kind, handler in handlers.items() if _is_async(handler)}
    if not kinds:
        return False
    if len(kinds) == len(handlers):
        return True
    raise click.BadParameter(
        f"{spec}: the handlers of {sorted(kinds)} are async def and those of "
        f"{sorted(set(handlers) - kinds)} are not; a worker runs either kind, not both: "
        "name each kind's handlers in its own MODULE:ATTR and run a worker for each",
        param_hint="MODULE:ATTR",
    )


async def _run_async(
    session: Session, handlers: Handlers, name: str | None, concurrency: int, *, until_idle: bool
) -> tuple[AsyncWorker, RunReport]:
    """Open an async store on the session's target, run an AsyncWorker, close the store."""
    target = session.target
    postgres = target.startswith(("postgresql://", "postgres://"))
    astore = AsyncStore(
        # Every store the session opens has effect_steps (impl.aio needs them).
        lambda: cast(SteppedStore, session.opener(target, session.config)),
        threads=POSTGRES_THREADS if postgres else 1,
    )
    async with astore:
        # _all_async checked that each handler is async def.
        coroutines = cast("dict[str, AsyncHandler]", handlers)
        runner = AsyncWorker(astore, coroutines, name=name, concurrency=concurrency)
        return runner, await runner.run(until_idle=until_idle)


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
