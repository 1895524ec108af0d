"""The CLI reference in specs/cli.md is generated from the command tree and must not drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from impl.cli import reference
from impl.cli.main import cli
from tests.cli.conftest import ROOT

PAGE = ROOT / "specs" / "cli.md"


def test_readme_reference_matches_the_commands() -> None:
    block = reference.embedded(PAGE.read_text(encoding="utf-8"))
    assert block is not None, (
        f"specs/cli.md lost its {reference.START} ... {reference.END} markers; put them back "
        "and run `python -m impl.cli.reference --write specs/cli.md`"
    )
    assert block.strip() == reference.render().strip(), (
        "specs/cli.md's CLI reference is stale: "
        "run `python -m impl.cli.reference --write specs/cli.md`"
    )


def test_render_covers_every_command_with_usage() -> None:
    text = reference.render()
    names = ["jobledger", *(f"jobledger {name}" for name in cli.list_commands(None))]  # type: ignore[arg-type]
    names.append("jobledger config show")
    names.append("jobledger metrics serve")
    for name in names:
        assert f"`{name}`" in text
    assert text.count("Usage: ") == len(names)
    assert "Usage: jobledger show [OPTIONS] JOB_ID" in text
    assert "-h, --help" in text


def test_render_does_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    first = reference.render()
    monkeypatch.setenv("COLUMNS", "40")
    assert reference.render() == first
    assert all(len(line) <= reference.WIDTH for line in first.splitlines())


def test_write_replaces_only_the_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{reference.START}\nstale-block-text\n{reference.END}\n\nafter\n")
    assert reference.main(["--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\n")
    assert text.endswith(f"{reference.END}\n\nafter\n")
    assert "stale-block-text" not in text
    assert (reference.embedded(text) or "").strip() == reference.render().strip()


def test_write_refuses_a_readme_without_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        reference.main(["--write", str(readme)])
