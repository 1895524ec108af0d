"""Real file-system faults for tests: a small tmpfs (disk full) and a read-only bind mount.

Mounting needs root. Outside CI a refused mount skips the test with a message; in CI
(``CI=true``) it fails, because there the faults must be proven, not assumed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)


def _refused(what: str, proc: subprocess.CompletedProcess[str]) -> None:
    message = f"cannot {what} ({proc.stderr.strip() or proc.returncode}); this test needs root"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _umount(path: Path) -> None:
    proc = _run("umount", str(path))
    if proc.returncode != 0:
        # Still busy (a file open in a dying thread): detach it so nothing stays mounted.
        _run("umount", "-l", str(path))


@contextmanager
def tmpfs(path: Path, *, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. ``"2m"``) on ``path`` (created) for the block."""
    path.mkdir(parents=True, exist_ok=True)
    proc = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if proc.returncode != 0:
        _refused(f"mount a tmpfs on {path}", proc)
    try:
        yield path
    finally:
        _umount(path)


def grow(path: Path, *, size: str) -> None:
    """Give the tmpfs on ``path`` more room (what an operator freeing space achieves)."""
    proc = _run("mount", "-o", f"remount,size={size}", str(path))
    assert proc.returncode == 0, proc.stderr


@contextmanager
def read_only(source: Path, view: Path) -> Iterator[Path]:
    """Bind-mount ``source`` read-only on ``view`` (created) for the block."""
    view.mkdir(parents=True, exist_ok=True)
    proc = _run("mount", "--bind", str(source), str(view))
    if proc.returncode != 0:
        _refused(f"bind-mount {source}", proc)
    try:
        proc = _run("mount", "-o", "remount,ro,bind", str(view))
        if proc.returncode != 0:
            _refused(f"remount {view} read-only", proc)
        yield view
    finally:
        _umount(view)
