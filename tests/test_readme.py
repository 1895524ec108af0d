"""The README's fifteen-line example runs as printed, and running it again replays."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import impl

README = Path(__file__).resolve().parents[1] / "README.md"


def example(index: int = 0) -> str:
    """The section's python blocks: the sync example (0), then the async one (1)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## In fifteen lines", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) > index, "the README lost one of its fifteen-line examples"
    return blocks[index]


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


def test_the_async_example_is_fifteen_lines_and_runs_once_per_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = compile(example(1), "README.md", "exec")
    assert len([line for line in example(1).splitlines() if line.strip()]) <= 15
    exec(code, {"__name__": "readme"})
    with impl.open_store("async-jobs.sqlite") as store:
        jobs = store.jobs()
        assert len(jobs) == 100
        assert {job.state for job in jobs} == {"DONE"}
        effects = {job.job_id: store.effects(job.job_id) for job in jobs}
    exec(code, {"__name__": "readme"})
    with impl.open_store("async-jobs.sqlite") as store:
        assert {job.job_id: store.effects(job.job_id) for job in store.jobs()} == effects
