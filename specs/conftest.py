"""Collects the Markdown specs in this folder as tests, one per backend.

Each ``NNN-topic.md`` becomes one test item per backend (``memory``, ``sqlite``,
``postgres``). The item runs every fenced ```` ```python ```` block of the document in
order, in one namespace pre-seeded with ``store`` (a fresh store of that backend on a
manual clock) and ``clock`` (the :class:`model.ManualClock`). A failure names the document,
the line of the failing block and the failing line inside it. No third-party plugin is
needed: this is a ``pytest_collect_file`` hook and a small ``pytest.Item``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

import impl
from impl.sqlite.store import SqliteStore
from model import ManualClock, Store
from tests.pg import postgres_factory, require_postgres

HERE = Path(__file__).parent
BACKENDS = ("memory", "sqlite", "postgres")
SPEC_NAME = re.compile(r"^\d{3}-[a-z0-9-]+\.md$")
# A fence opens with ```python alone on its line and closes with ``` alone on its line.
FENCE = re.compile(r"^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@attrs.frozen
class Block:
    """One python block of a spec: its source and the document line its code starts on."""

    line: int
    code: str


def parse_blocks(text: str) -> list[Block]:
    """Return the document's ```` ```python ```` blocks in order."""
    return [
        Block(line=text.count("\n", 0, match.start("code")) + 1, code=match.group("code"))
        for match in FENCE.finditer(text)
    ]


class SpecBlockFailed(Exception):
    """A block of a spec raised; carries where, for the report."""

    def __init__(self, path: Path, block: Block, backend: str, error: BaseException) -> None:
        super().__init__(f"{path.name}: block at line {block.line} failed on {backend}")
        self.path = path
        self.block = block
        self.backend = backend
        self.error = error


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``spec`` marker, so ``-m spec`` selects (or deselects) the documents."""
    config.addinivalue_line("markers", "spec: a Markdown spec document run as a test")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.File | None:
    """Collect ``specs/NNN-topic.md`` documents."""
    if file_path.parent == HERE and SPEC_NAME.match(file_path.name):
        spec: SpecFile = SpecFile.from_parent(parent, path=file_path)
        return spec
    return None


class SpecFile(pytest.File):
    """One Markdown spec: an item per backend."""

    def collect(self) -> Iterator[pytest.Item]:
        """Yield one :class:`SpecItem` per backend."""
        blocks = parse_blocks(self.path.read_text(encoding="utf-8"))
        for backend in BACKENDS:
            yield SpecItem.from_parent(self, name=backend, backend=backend, blocks=blocks)


class SpecItem(pytest.Item):
    """A spec document run on one backend."""

    def __init__(self, *, backend: str, blocks: list[Block], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.backend = backend
        self.blocks = blocks
        self._cleanups: list[Callable[[], None]] = []
        self.add_marker(pytest.mark.spec)

    def _open(self, clock: ManualClock) -> Store:
        if self.backend == "memory":
            return impl.open_store("memory:", clock=clock)
        if self.backend == "sqlite":
            folder = Path(tempfile.mkdtemp(prefix="jobledger-spec-"))
            self._cleanups.append(lambda: shutil.rmtree(folder, ignore_errors=True))
            return SqliteStore(folder / "spec.sqlite", clock=clock)
        require_postgres()
        # postgres_factory empties this process's reused schema; tests/pg.py drops it at
        # session end.
        make, cleanup = postgres_factory(clock)
        self._cleanups.append(cleanup)
        return make()

    def runtest(self) -> None:
        """Run every python block of the document in order, in one namespace."""
        if not self.blocks:
            pytest.fail(f"{self.path.name} has no ```python blocks to check", pytrace=False)
        clock = ManualClock()
        store = self._open(clock)
        self._cleanups.insert(0, store.close)
        namespace: dict[str, object] = {
            "__name__": f"spec_{self.path.stem.replace('-', '_')}",
            "store": store,
            "clock": clock,
        }
        for block in self.blocks:
            # Padding with newlines makes tracebacks report lines of the .md file itself.
            source = "\n" * (block.line - 1) + block.code
            code = compile(source, str(self.path), "exec")
            try:
                exec(code, namespace)  # noqa: S102 - running the spec's own code is the point
            except Exception as exc:
                raise SpecBlockFailed(self.path, block, self.backend, exc) from exc

    def teardown(self) -> None:
        """Close the store and delete what it left on disk (or in PostgreSQL)."""
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in cleanups:
            cleanup()

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: str | None = None,
    ) -> str:
        """Report the document, the block's line, the failing line and the error."""
        failure = excinfo.value
        if not isinstance(failure, SpecBlockFailed):
            return str(super().repr_failure(excinfo))
        error = failure.error
        frames = [
            f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(self.path)
        ]
        failing = frames[-1].lineno if frames else failure.block.line
        lines = self.path.read_text(encoding="utf-8").splitlines()
        shown = lines[failing - 1].strip() if failing and failing <= len(lines) else ""
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return (
            f"{self.path.name}, python block at line {failure.block.line}, failing at line "
            f"{failing} on backend {failure.backend}:\n    {shown}\n\n{detail}"
        )

    def reportinfo(self) -> tuple[Path, int, str]:
        """Point at the document."""
        return self.path, 0, f"{self.path.name}[{self.backend}]"
