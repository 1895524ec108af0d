"""The command-line reference of specs/cli.md, generated from the click command tree.

``render()`` returns Markdown: one section per command with its ``--help`` text, at a
fixed width so the output does not depend on the terminal. specs/cli.md embeds it between
the markers below, and a test fails when the two drift apart; regenerate with::

    python -m impl.cli.reference --write specs/cli.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from impl.cli import readme as readme_block
from impl.cli.main import cli

START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"
WIDTH = 88


def _sections(
    command: click.Command, parent: click.Context | None, name: str
) -> list[tuple[str, str]]:
    settings: dict[str, object] = {
        **command.context_settings,
        "terminal_width": WIDTH,
        "max_content_width": WIDTH,
    }
    ctx = click.Context(command, info_name=name, parent=parent, **settings)  # type: ignore[arg-type]
    out = [(ctx.command_path, command.get_help(ctx))]
    if isinstance(command, click.Group):
        for sub_name in command.list_commands(ctx):
            sub = command.get_command(ctx, sub_name)
            if sub is not None and not sub.hidden:
                out.extend(_sections(sub, ctx, sub_name))
    return out


def render() -> str:
    """Return the Markdown reference of every ``jobledger`` command."""
    parts: list[str] = []
    for path, text in _sections(cli, None, "jobledger"):
        heading = "###" if " " in path else "##"
        body = "\n".join(line.rstrip() for line in text.splitlines())
        parts.append(f"{heading} `{path}`\n\n```text\n{body}\n```\n")
    return "\n".join(parts)


def embedded(readme: str) -> str | None:
    """Return the text between this block's markers in ``readme``, or None if absent."""
    return readme_block.embedded(readme, START, END)


def replace_block(readme: str, reference: str) -> str:
    """Return ``readme`` with this block's text replaced by ``reference``."""
    return readme_block.replace_block(readme, reference, START, END)


def main(argv: list[str] | None = None) -> int:
    """``python -m impl.cli.reference [--write specs/cli.md]``: print or update the reference."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--write"] and len(args) == 2:
        path = Path(args[1])
        path.write_text(replace_block(path.read_text(encoding="utf-8"), render()), "utf-8")
        return 0
    if args:
        print("usage: python -m impl.cli.reference [--write specs/cli.md]", file=sys.stderr)
        return 2
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
