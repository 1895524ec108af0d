"""``jobledger config show``: the effective configuration and where each value came from."""

from __future__ import annotations

import click

from impl.cli import output
from impl.cli.session import Session, pass_session
from impl.config import env_var


@click.group(name="config")
def config_group() -> None:
    """Inspect the configuration.

    Layers, each overriding the one before: defaults, the YAML file, JOBLEDGER_*
    environment variables, the command line (--db, --set)."""


@config_group.command()
@click.option(
    "--json", "as_json", is_flag=True, help="Print {key: {value, source, env}} as one JSON object."
)
@pass_session
def show(session: Session, as_json: bool) -> None:
    """Show the effective configuration and where each value came from.

    The source is "default", the file and line, the JOBLEDGER_* variable, or
    "command line"."""
    config, sources = session.load()
    values = output.plain(config)
    assert isinstance(values, dict)
    if as_json:
        output.print_json(
            {
                "config_file": str(session.config_file) if session.config_file else None,
                "db": {"value": session.target, "source": session.target_source},
                "values": {
                    key: {"value": values[key], "source": sources[key], "env": env_var(key)}
                    for key in values
                },
            }
        )
        return
    con = output.console()
    con.print(f"config file: {session.config_file or '(none)'}")
    con.print(f"database: {session.target} (from {session.target_source})")
    out = output.table("key", "value", "source")
    for key, value in values.items():
        out.add_row(key, "-" if value is None else str(value), sources[key])
    con.print(out)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(config_group)
