"""The command-line examples of specs/cli.md: real output of every ``jobledger`` command.

:func:`build` makes a small ledger of thumbnail jobs in a scratch folder, as a day of
work would leave it: three jobs done, one running, one whose worker died in the middle of
an upload, one that failed all its attempts, three waiting. The store runs on an injected
clock that moves only when this script moves it, so ids, tokens, times and durations are
the same on every run. Then it runs each command through click's runner with
``JOBLEDGER_DB`` set, as an operator would type it, and keeps what it printed (stdout and
stderr, as a terminal shows them) and its exit code. :func:`render` turns that into the
Markdown between the markers of specs/cli.md; regenerate them with::

    python -m impl.cli.examples --write specs/cli.md

``tests/cli/test_cli_examples.py`` fails when they drift. Two commands cannot be
reproduced byte for byte, and their examples are marked unstable: ``download`` and
``demo`` talk to a real HTTP server on 127.0.0.1 and report timings (``demo`` also
SIGKILLs real worker processes). The scratch folder's path is shown as a relative path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import attrs
from attrs import frozen
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from impl import failpoint
from impl.cli import readme as readme_block
from impl.cli.main import cli
from impl.download.testserver import FileServer, generated_bytes
from impl.metrics import server as metrics_server
from impl.metrics.server import MetricsServer
from impl.store import open_store
from impl.worker import Worker
from model import ManualClock, Workflow
from model.config import Config
from model.record import JSON, EffectContext
from model.store import Store

START = "<!-- cli-examples:start -->"
END = "<!-- cli-examples:end -->"
WIDTH = 120
"""Columns the tables are laid out for (``COLUMNS``)."""
UNSTABLE_WIDTH = 1000
"""Columns for unstable examples: wide enough that no line wraps, so lines compare."""
EPOCH = datetime(2026, 3, 2, 9, 0, tzinfo=UTC).timestamp()
"""When the example ledger's day starts: 2026-03-02 09:00:00 UTC."""
DB = "thumbs.sqlite"
CONFIG_FILE = "jobledger.yaml"
CONFIG_YAML = "# jobledger.yaml, next to the ledger\nlease_ttl: 60\nmax_attempts: 3\n"

THUMBNAIL = Workflow(
    name="thumbnail",
    states=["PLANNED", "RENDERED", "STORED"],
    transitions=[("PLANNED", "RENDERED"), ("RENDERED", "STORED")],
    initial="PLANNED",
    terminal=["STORED"],
)

HANDLERS_SOURCE = '''\
"""thumbs.py: render a thumbnail, upload it to the bucket, for `jobledger worker`."""

from pathlib import Path

BUCKET = Path("bucket")  # stands for an object store


def handle(ctx):
    key = "thumbs/" + ctx.identity["image"].rsplit(".", 1)[0] + ".webp"
    ctx.effect("RENDER", lambda e: {"key": key, "width": ctx.payload["width"]})
    ctx.advance("RENDERED")

    def upload(e):
        target = BUCKET / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"webp bytes of " + key.encode())
        return {"key": key, "bytes": target.stat().st_size}

    def landed(info):
        # The upload is in doubt (its worker died): look before uploading again.
        target = BUCKET / key
        return {"key": key, "bytes": target.stat().st_size} if target.exists() else None

    ctx.effect("UPLOAD", upload, on_doubt=landed)
    ctx.advance("STORED")


handlers = {"thumbnail": handle}
'''
"""The handler module the ``worker`` example runs (and specs/cli.md shows)."""


@frozen
class Example:
    """One command as specs/cli.md shows it."""

    intro: str
    args: tuple[str, ...]
    code: int
    output: str
    stable: bool = True

    @property
    def command(self) -> str:
        """The command line as typed."""
        return "jobledger " + shlex.join(self.args)


@frozen
class Ledger:
    """The ids of the example ledger's jobs that the examples name."""

    crashed: str
    poisoned: str
    unwanted: str


def _image(n: int, ext: str = "jpg") -> dict[str, str | int | bool | None]:
    return {"image": f"cat-{n:03d}.{ext}"}


def populate(store: Store, clock: ManualClock) -> Ledger:
    """Fill ``store`` with the example day, from 09:00:00 to 09:01:30 on ``clock``."""
    namespace: dict[str, object] = {}
    # The worker example imports this same source from thumbs.py; run it the same way here.
    exec(compile(HANDLERS_SOURCE, "thumbs.py", "exec"), namespace)  # noqa: S102
    handlers = namespace["handlers"]
    assert isinstance(handlers, Mapping)
    payload: JSON = {"width": 256}
    clock.now = EPOCH
    store.register(THUMBNAIL)
    for n in (1, 2, 3):
        store.plan("thumbnail", _image(n), payload=payload)
    worker = Worker(store, handlers, name="render-1")
    while worker.run_once():
        clock.advance(1.5)

    # A file the image library of the running release cannot read: every attempt fails.
    clock.now = EPOCH + 12
    poisoned = store.plan("thumbnail", _image(13, "heic"), payload=payload, max_attempts=3)
    for attempt in (1, 2, 3):
        lease = store.lease_next("render-1")
        assert lease is not None
        assert lease.job_id == poisoned
        store.fail(lease, "UnidentifiedImageError: cat-013.heic")
        clock.advance(float(2 ** (attempt - 1)))

    # render-2 uploads, then dies before the upload's result is recorded.
    clock.now = EPOCH + 40
    crashed = store.plan("thumbnail", _image(4), payload=payload)
    lease = store.lease_next("render-2", ttl=60)
    assert lease is not None
    store.run_effect(lease, "RENDER", lambda e: {"key": "thumbs/cat-004.webp"})
    store.advance(lease, "RENDERED")
    clock.advance(2)
    failpoint.arm("effect.before_record")
    try:
        store.run_effect(lease, "UPLOAD", _upload_cat_004)
    except failpoint.Crash:
        pass  # render-2 is gone; its lease runs out at 09:01:40
    finally:
        failpoint.disarm_all()

    # render-3 is busy with a job and renewing its lease.
    clock.now = EPOCH + 75
    running = store.plan("thumbnail", _image(5), payload=payload)
    clock.now = EPOCH + 80
    lease = store.lease_next("render-3", ttl=60)
    assert lease is not None
    assert lease.job_id == running
    store.run_effect(lease, "RENDER", lambda e: {"key": "thumbs/cat-005.webp"})
    store.advance(lease, "RENDERED")
    clock.now = EPOCH + 90
    waiting = [store.plan("thumbnail", _image(n), payload=payload) for n in (6, 7, 8)]
    clock.now = EPOCH + 120
    store.renew(lease, ttl=60)
    clock.now = EPOCH + 150
    return Ledger(crashed=crashed, poisoned=poisoned, unwanted=waiting[-1])


def _upload_cat_004(_ctx: EffectContext) -> JSON:
    target = Path("bucket/thumbs/cat-004.webp")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"webp bytes of thumbs/cat-004.webp")
    return {"key": str(target.relative_to("bucket")), "bytes": target.stat().st_size}


class _Shell:
    """Runs ``jobledger`` commands in ``workdir`` against the example ledger's clock."""

    def __init__(self, workdir: Path, clock: ManualClock) -> None:
        self.workdir = workdir
        self.clock = clock
        self.examples: list[Example] = []

    def _open(self, target: str, config: Config) -> Store:
        return open_store(target, clock=self.clock, config=config)

    def run(self, intro: str, *args: str, stable: bool = True) -> Example:
        """Run ``jobledger ARGS``, keep it as an example and return it."""
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("JOBLEDGER_")}
        env["JOBLEDGER_DB"] = DB
        env["JOBLEDGER_CONFIG"] = CONFIG_FILE
        env["COLUMNS"] = str(WIDTH if stable else UNSTABLE_WIDTH)
        result = CliRunner().invoke(cli, list(args), env=env, obj=self._open)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        example = Example(intro, args, result.exit_code, self._tidy(result.output), stable)
        self.examples.append(example)
        return example

    def _tidy(self, text: str) -> str:
        for root in {str(self.workdir.resolve()), str(self.workdir)}:
            text = text.replace(root + os.sep, "").replace(root, ".")
        return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def build(workdir: Path) -> list[Example]:
    """Make the example ledger in ``workdir`` and run every example command there.

    ``workdir`` should be empty; the current directory is ``workdir`` while it runs.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(workdir):
        (workdir / CONFIG_FILE).write_text(CONFIG_YAML, encoding="utf-8")
        (workdir / "thumbs.py").write_text(HANDLERS_SOURCE, encoding="utf-8")
        clock = ManualClock(EPOCH)
        store = open_store(workdir / DB, clock=clock, config=Config(lease_ttl=60, max_attempts=3))
        try:
            ledger = populate(store, clock)
        finally:
            store.close()
        shell = _Shell(workdir, clock)
        try:
            _observe(shell, ledger)
            _act(shell, ledger)
            _deploy(shell, workdir)
        finally:
            # `jobledger worker` imported thumbs.py from here; forget it.
            sys.modules.pop("thumbs", None)
            for entry in (str(workdir), str(workdir.resolve())):
                while entry in sys.path:
                    sys.path.remove(entry)
    return shell.examples


def _observe(shell: _Shell, ledger: Ledger) -> None:
    shell.run(
        "Start here. `status` counts jobs by kind and state, and shows the leases, the effects "
        "in doubt, the failed jobs and the queue lag (how long the oldest eligible job has "
        "waited; a lag that keeps growing means no worker is taking jobs):",
        "status",
    )
    shell.run("The same as one JSON object, for scripts and monitoring:", "status", "--json")
    _metrics(shell)
    shell.run(
        "Who holds what: every lease with its worker, fencing token and time left. An expired "
        "lease means its worker stopped renewing: it crashed, hung or lost the database.",
        "leases",
    )
    shell.run(
        "The jobs themselves, oldest first (`--state`, `--kind`, `--limit`, `--newest` narrow "
        "it down):",
        "jobs",
    )
    shell.run(
        "As JSON, one object per job (`--limit 1` keeps this example short):",
        "jobs",
        "--json",
        "--limit",
        "1",
    )
    shell.run(
        "Before acting, see what a reconcile pass would do; `--dry-run` changes nothing:",
        "reconcile",
        "--dry-run",
    )
    shell.run(
        "Then run it. It expires dead leases, marks the effects their workers had started in "
        "doubt, and fails jobs with no attempts left. It is safe beside running workers and "
        "from cron:",
        "reconcile",
    )
    shell.clock.advance(5)
    shell.run(
        "Look into one job (any unique prefix of its id works): identity, payload, state, "
        "attempts, lease, each effect with its result, and the job's whole history. This is "
        "the job whose worker died during `UPLOAD`: the upload is now in doubt, and the "
        "`on_doubt` probe of its handler will decide it when a worker takes the job again.",
        "show",
        ledger.crashed[:12],
    )


def _metrics(shell: _Shell) -> None:
    """``metrics serve`` runs until SIGTERM: the example scrapes the endpoint the command
    started, as Prometheus would, then stops it as a supervisor would."""
    scraped: list[str] = []
    serve = metrics_server.serve

    def serve_then_stop(registry: CollectorRegistry, *, port: int, host: str) -> MetricsServer:
        server = serve(registry, port=port, host=host)

        def scrape_then_stop() -> None:
            try:
                # The http://127.0.0.1 URL of the server just started, nothing else.
                with urllib.request.urlopen(server.url, timeout=30) as response:  # noqa: S310
                    scraped.append(response.read().decode("utf-8"))
            finally:
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=scrape_then_stop, daemon=True).start()
        return server

    intro = (
        "For Prometheus, `metrics serve` exposes the ledger at `/metrics` (127.0.0.1 unless "
        "`--host` says otherwise; `--port 0` picks a free port), read from the ledger at "
        "every scrape; `worker --metrics-port P` adds each worker process's own counters. "
        "The alert rules and the Grafana dashboard that read them ship in "
        "`impl/metrics/monitoring/`, and `specs/010-monitoring-playbook.md` says what to do "
        "when an alert fires. A scrape of this ledger (its `jobledger_*` lines):"
    )
    with _patched(metrics_server, "serve", serve_then_stop):
        example = shell.run(intro, "metrics", "serve", "--port", "0", stable=False)
    lines = [
        line
        for text in scraped
        for line in text.splitlines()
        if line.startswith("jobledger_") and not line.startswith("jobledger_stats_read")
    ]
    shell.examples[-1] = attrs.evolve(
        example, intro=intro + "\n\n```text\n" + "\n".join(lines) + "\n```\n\nThe command:"
    )


@contextlib.contextmanager
def _patched(module: object, name: str, value: object) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _act(shell: _Shell, ledger: Ledger) -> None:
    shell.clock.advance(5)
    shell.run(
        "A failed job stays failed until an operator says otherwise. Once the cause is fixed "
        "(here, a release that reads HEIC files), `retry` puts it back in the state it failed "
        "in with its attempts reset (`--all-failed` retries every failed job):",
        "retry",
        ledger.poisoned[:12],
    )
    shell.run(
        "`cancel` stops a job for good, even one a worker holds (that worker's next call "
        "fails with `LeaseLost`); the reason is kept as its last error:",
        "cancel",
        ledger.unwanted[:12],
        "--reason",
        "image deleted by its owner",
    )
    shell.clock.advance(5)
    shell.run(
        "`worker MODULE:ATTR` runs the handlers that `thumbs.handlers` names, renewing each "
        "lease in the background; `--until-idle` stops when nothing is eligible (exit 1 if a "
        "job failed for good). The module:\n\n```python\n"
        + HANDLERS_SOURCE
        + "```\n\nIt finishes the crashed job (its probe finds the upload in the bucket and "
        "records it without uploading again), the retried one and the queue; render-3 still "
        "holds its job:",
        "worker",
        "thumbs:handlers",
        "--until-idle",
        "--name",
        "render-4",
    )
    shell.run(
        "The crashed job's history now tells the rest: the new lease met the upload in doubt, "
        "the probe found it and its result was recorded once:",
        "show",
        ledger.crashed[:12],
    )
    shell.run("And the ledger afterwards:", "status")
    shell.clock.advance(3600)
    shell.run(
        "Finished jobs keep their rows, effects and history until they are pruned. `prune` "
        "removes those that finished longer ago than an age (`30d`, `12h`, `0s`), in short "
        "batches beside running workers; each leaves a tombstone of its key, so planning it "
        "again changes nothing. `--dry-run` counts first (`--keep-failed`, `--archive FILE` "
        "and `--forget-keys` are in specs/009-retention.md):",
        "prune",
        "--finished-before",
        "30m",
        "--dry-run",
    )


def _deploy(shell: _Shell, workdir: Path) -> None:
    shell.run(
        "Where each setting comes from: the default, a line of the YAML file, a `JOBLEDGER_*` "
        "variable or the command line:",
        "config",
        "show",
    )
    with FileServer() as server:
        lines = [
            json.dumps(
                {
                    "work_id": "report-2026-03",
                    "artifact_id": f"part-{n}",
                    "url": server.add(f"/reports/part-{n}.bin", generated_bytes(n, 300_000)),
                }
            )
            for n in (1, 2, 3)
        ]
        (workdir / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        shell.run(
            "`download` plans one job per line of a manifest (JSON Lines of `work_id`, "
            "`artifact_id`, `url`, or a plain list of URLs; here three files on a local "
            "server) and runs worker threads until every job is terminal. Run it again after "
            "a crash: finished files are not fetched again and partial ones resume with "
            "HTTP Range.",
            "download",
            "manifest.jsonl",
            "--out",
            "downloads",
            "--workers",
            "2",
            stable=False,
        )
    shell.run(
        "Before deploying a new release, check the schema: exit 0 when it is current,",
        "migrate",
        "--check",
    )
    shell.run(
        "exit 1 when migrations are pending (here a database that does not exist yet),",
        "--db",
        "new.sqlite",
        "migrate",
        "--check",
    )
    shell.run(
        "and `migrate` applies them (after a backup: a migrated database cannot be opened by "
        "an older release):",
        "--db",
        "new.sqlite",
        "migrate",
    )
    shell.run(
        "`selftest` runs the multi-process crash fuzz on a disk of your choice (here a few "
        "seconds of it) and checks the recorded history; exit 1 with the violations if any:",
        "selftest",
        "--dir",
        "selftest",
        "--seconds",
        "3",
        "--workers",
        "2",
        stable=False,
    )
    shell.run(
        "`demo` shows the crash safety end to end with its own ledger: it serves files on "
        "127.0.0.1, SIGKILLs worker processes mid-stream, resumes, and checks every byte:",
        "demo",
        "--files",
        "4",
        "--kills",
        "1",
        stable=False,
    )


def render(examples: list[Example]) -> str:
    """Return the Markdown block of ``examples``."""
    head = (
        "Real output, generated by `python -m impl.cli.examples --write specs/cli.md` on a small "
        "ledger of `thumbnail` jobs (render an image, upload the thumbnail) with "
        f"`JOBLEDGER_DB={DB}` and `JOBLEDGER_CONFIG={CONFIG_FILE}`:\n\n"
        f"```yaml\n{CONFIG_YAML}```\n\n"
        "Three jobs are done, worker render-3 is running one, render-2 died in the middle of "
        "an upload, one job failed all three attempts, and three wait in the queue. The "
        "[operator's guide](007-operators-guide.md) says what to do in each case.\n"
    )
    parts = [head]
    for example in examples:
        lines = [f"$ {example.command}"]
        if example.output:
            lines.append(example.output)
        if example.code:
            lines += ["$ echo $?", str(example.code)]
        body = "\n".join(lines)
        parts.append(f"{example.intro}\n\n```console\n{body}\n```\n")
    return "\n".join(parts)


def embedded(readme: str) -> str | None:
    """Return the text between this block's markers in ``readme``, or None if absent."""
    return readme_block.embedded(readme, START, END)


def replace_block(readme: str, block: str) -> str:
    """Return ``readme`` with this block's text replaced by ``block``."""
    return readme_block.replace_block(readme, block, START, END)


def main(argv: list[str] | None = None) -> int:
    """``python -m impl.cli.examples [--write specs/cli.md]``: print or update the examples."""
    args = sys.argv[1:] if argv is None else argv
    if args and (args[0] != "--write" or len(args) != 2):
        print("usage: python -m impl.cli.examples [--write specs/cli.md]", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="jobledger-examples-") as scratch:
        block = render(build(Path(scratch) / "thumbs"))
    if not args:
        sys.stdout.write(block)
        return 0
    path = Path(args[1])
    path.write_text(replace_block(path.read_text(encoding="utf-8"), block), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
