"""The README's fifteen-line example runs as printed, and running it again replays."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import impl

README = Path(__file__).resolve().parents[1] / "README.md"


def example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## In fifteen lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README lost its fifteen-line example"
    return match.group(1)


def test_the_readme_example_is_fifteen_lines_of_code() -> None:
    assert len([line for line in example().splitlines() if line.strip()]) <= 15


def test_the_readme_example_runs_and_a_second_run_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = compile(example(), "README.md", "exec")
    exec(code, {"__name__": "readme"})
    with impl.open_store("jobs.sqlite") as store:
        (job,) = store.jobs()
        assert job.state == "SENT"
        effects = store.effects(job.job_id)
        history = store.history(job.job_id)
    exec(code, {"__name__": "readme"})
    with impl.open_store("jobs.sqlite") as store:
        assert store.effects(job.job_id) == effects
        assert store.history(job.job_id) == history
