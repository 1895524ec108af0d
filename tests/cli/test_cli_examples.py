"""The command-line examples in specs/cli.md are real output of the commands and must not drift.

The examples are regenerated once per module (``impl.cli.examples.build``: a fresh ledger
on a fixed clock, every command run through click's runner) and compared with what the
the page shows: the same commands in the same order, the same exit codes, the same output
byte for byte where the output is deterministic, and the same shape (numbers, ids and
timings aside) for ``download`` and ``demo``, which talk to a real local server. When this
fails after an intended change, regenerate with
``python -m impl.cli.examples --write specs/cli.md``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from attrs import frozen

from impl.cli import examples
from impl.cli.examples import Example
from impl.cli.main import cli
from tests.cli.conftest import ROOT

PAGE = ROOT / "specs" / "cli.md"
REGENERATE = "regenerate with `python -m impl.cli.examples --write specs/cli.md`"
CONSOLE = re.compile(r"^```console\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)

# The demo kills real processes and builds a ledger; one xdist worker runs such tests.
pytestmark = pytest.mark.xdist_group("processes")


@frozen
class Shown:
    """One example as specs/cli.md shows it."""

    command: str
    code: int
    output: str


def parse(block: str) -> list[Shown]:
    """Return the ``$ jobledger ...`` console examples of a rendered block, in order."""
    shown: list[Shown] = []
    for match in CONSOLE.finditer(block):
        lines = match.group("body").rstrip("\n").split("\n")
        assert lines[0].startswith("$ jobledger "), (
            f"a console example must start with a command: {lines[0]!r}"
        )
        code = 0
        if len(lines) >= 3 and lines[-2] == "$ echo $?":
            code = int(lines[-1])
            lines = lines[:-2]
        shown.append(Shown(lines[0].removeprefix("$ "), code, "\n".join(lines[1:])))
    return shown


def skeleton(output: str) -> list[str]:
    """Return the output's lines without what varies between runs of an unstable example.

    Numbers (bytes, ports, seconds) and ids are blanked; the demo's "job ... is leased by
    worker ..." lines are dropped, since how many leases it waits for depends on timing.
    """
    out = []
    for line in output.splitlines():
        if line.startswith("job "):
            continue
        without_ids = re.sub(r"[0-9a-f]{12,64}", "<id>", line)
        out.append(re.sub(r"\d+(\.\d+)?", "<n>", without_ids))
    return out


def labels(output: str) -> list[str]:
    """Return the first word of each line: the labels of the selftest report."""
    return [line.split()[0] for line in output.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> list[Example]:
    """The examples as the commands print them now."""
    return examples.build(tmp_path_factory.mktemp("examples") / "thumbs")


@pytest.fixture(scope="module")
def shown() -> list[Shown]:
    """The examples as specs/cli.md shows them."""
    block = examples.embedded(PAGE.read_text(encoding="utf-8"))
    assert block is not None, (
        f"specs/cli.md lacks {examples.START} ... {examples.END}; {REGENERATE}"
    )
    found = parse(block)
    assert found, f"specs/cli.md's examples block is empty; {REGENERATE}"
    return found


def test_readme_shows_the_commands_the_generator_runs(
    built: list[Example], shown: list[Shown]
) -> None:
    assert [s.command for s in shown] == [e.command for e in built], REGENERATE


def test_each_shown_command_exits_as_shown(built: list[Example], shown: list[Shown]) -> None:
    assert [(s.command, s.code) for s in shown] == [(e.command, e.code) for e in built]
    assert {e.code for e in built} == {0, 1}, "the examples show both success and exit 1"


def test_deterministic_outputs_match_byte_for_byte(
    built: list[Example], shown: list[Shown]
) -> None:
    for example, seen in zip(built, shown, strict=True):
        if example.stable:
            assert seen.output == example.output, f"`{example.command}` drifted; {REGENERATE}"


def test_download_and_demo_outputs_keep_their_shape(
    built: list[Example], shown: list[Shown]
) -> None:
    unstable = [(e, s) for e, s in zip(built, shown, strict=True) if not e.stable]
    assert {e.args[0] for e, _ in unstable} == {"download", "demo", "selftest", "metrics"}
    for example, seen in unstable:
        if example.args[0] == "selftest":
            # A fuzz run's figures vary line by line; its report keeps its labelled lines.
            assert labels(seen.output) == labels(example.output), (
                f"`{example.command}` prints something else now; {REGENERATE}"
            )
            continue
        assert skeleton(seen.output) == skeleton(example.output), (
            f"`{example.command}` prints something else now; {REGENERATE}"
        )


def test_every_command_has_an_example(built: list[Example]) -> None:
    """A new command without an example in specs/cli.md fails here."""
    ran = {arg for e in built for arg in e.args if arg in cli.commands}
    assert ran == set(cli.commands)
    assert any(e.args[-2:] == ("config", "show") for e in built)
    for args in (("status", "--json"), ("jobs", "--json"), ("reconcile", "--dry-run")):
        assert any(e.args[: len(args)] == args for e in built), args


def test_examples_show_real_work(built: list[Example]) -> None:
    """The ledger is in the situations the operator's guide talks about."""
    first = {}
    for example in built:
        first.setdefault(example.command, example)
    assert "in doubt: 1" in first["jobledger status"].output
    assert "expired" in first["jobledger leases"].output
    show = next(e for e in built if e.args[0] == "show")
    assert "in_doubt" in show.output
    assert "effect_in_doubt" in show.output
    worker = next(e for e in built if e.args[0] == "worker")
    assert "0 failed attempt(s)" in worker.output
    demo = next(e for e in built if e.args[0] == "demo")
    assert "4/4 files verified by SHA-256" in demo.output
    fuzz = next(e for e in built if e.args[0] == "selftest")
    assert "  violations    0" in fuzz.output.splitlines()
    assert fuzz.code == 0


def test_render_parses_back(built: list[Example]) -> None:
    again = parse(examples.render(built))
    assert [(s.command, s.code, s.output) for s in again] == [
        (e.command, e.code, e.output) for e in built
    ]


def test_write_replaces_only_the_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{examples.START}\nstale\n{examples.END}\n\nafter\n")
    text = examples.replace_block(readme.read_text(), "new block")
    assert text == f"# title\n\n{examples.START}\nnew block\n{examples.END}\n\nafter\n"
    with pytest.raises(ValueError, match="markers"):
        examples.replace_block("# no markers\n", "x")
