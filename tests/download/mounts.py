"""Real file-system faults for tests: a small tmpfs (disk full), a read-only bind mount,
and an ext4 image with user quotas (EDQUOT) where the kernel has them.

Mounting needs root. Outside CI a refused mount skips the test with a message; in CI
(``CI=true``) it fails, because there the faults must be proven, not assumed.
"""

from __future__ import annotations

import os
import shutil
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


@contextmanager
def ext4_with_quota(path: Path, *, size: str) -> Iterator[Path]:
    """Mount an ext4 image of ``size`` (e.g. ``"16M"``) with user quotas on ``path``.

    Skips (in CI too: it is the kernel's feature, not a permission) when the image
    cannot be made or mounted with quotas, or ``setquota`` (the quota tools) is missing.
    """
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed, so no quota can be set up; EDQUOT is not proven")
    image = path.parent / f"{path.name}.img"
    path.mkdir(parents=True, exist_ok=True)
    proc = _run("truncate", "-s", size, str(image))
    assert proc.returncode == 0, proc.stderr
    try:
        made = _run("mkfs.ext4", "-q", "-O", "quota", "-E", "quotatype=usrquota", str(image))
        if made.returncode != 0:
            pytest.skip(f"cannot make an ext4 image with quotas ({made.stderr.strip()})")
        mounted = _run("mount", "-o", "loop", str(image), str(path))
        if mounted.returncode != 0:
            pytest.skip(
                f"cannot mount an ext4 image with quotas ({mounted.stderr.strip()}); this "
                "kernel may lack CONFIG_QUOTA and CONFIG_QFMT_V2, so EDQUOT is not proven"
            )
        try:
            if shutil.which("setquota") is None:
                pytest.skip("setquota (the quota tools) is not installed; EDQUOT is not proven")
            yield path
        finally:
            _umount(path)
    finally:
        image.unlink(missing_ok=True)


def set_block_quota(mount: Path, *, user: str, hard_kib: int) -> None:
    """Limit ``user`` to ``hard_kib`` KiB on ``mount`` (0: no limit)."""
    proc = _run("setquota", "-u", user, "0", str(hard_kib), "0", "0", str(mount))
    assert proc.returncode == 0, proc.stderr
