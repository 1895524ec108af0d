"""``impl.world``: which OS errors are the world's, the line each becomes, and the room a
download run holds beside a file ledger (``LedgerReserve``)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from impl.world import (
    LEDGER_RESERVE_BYTES,
    WORLD_ERRNOS,
    EnvironmentFault,
    LedgerReserve,
    fault_of,
    is_world_error,
)
from tests.download.mounts import tmpfs


def test_the_reserve_is_really_allocated_and_given_back(tmp_path: Path) -> None:
    reserve = LedgerReserve(tmp_path / "l.sqlite")
    reserve.hold()
    assert reserve.path.name == f"l.sqlite-reserve.{os.getpid()}"
    assert reserve.path.stat().st_size == LEDGER_RESERVE_BYTES
    assert reserve.path.stat().st_blocks * 512 >= LEDGER_RESERVE_BYTES  # not a sparse file
    reserve.free()
    reserve.free()  # twice is fine
    assert list(tmp_path.iterdir()) == []


def test_a_reserve_left_by_a_dead_process_is_removed_and_a_live_ones_kept(
    tmp_path: Path,
) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    left = tmp_path / f"l.sqlite-reserve.{int(dead.stdout)}"
    left.write_bytes(b"\0" * 10)
    live = tmp_path / f"l.sqlite-reserve.{os.getppid()}"
    live.write_bytes(b"\0" * 10)
    reserve = LedgerReserve(tmp_path / "l.sqlite")
    reserve.hold()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, reserve.path.name])
    reserve.free()


@pytest.mark.xdist_group("mounts")
def test_no_room_for_the_reserve_is_one_line_naming_the_ledger(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="512k") as disk:
        reserve = LedgerReserve(disk / "l.sqlite")
        with pytest.raises(EnvironmentFault) as refused:
            reserve.hold()
        line = str(refused.value)
        assert line.startswith(f"disk full: cannot write {disk / 'l.sqlite'}")
        assert "free at least 1.0 MiB where the database lives" in line
        assert list(disk.iterdir()) == []  # nothing left behind


REFUSALS = [
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EMFILE,
    errno.ENFILE,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
]


@pytest.mark.parametrize("number", REFUSALS)
def test_each_refusal_of_the_machine_is_a_fault_that_names_path_and_remedy(number: int) -> None:
    """Every errno the world answers with (EDQUOT included, which this kernel cannot
    produce for real) becomes one line: what, which path, what to do, nothing lost."""
    exc = OSError(number, os.strerror(number), "/data/out/f.part")
    assert is_world_error(exc)
    fault = fault_of(exc, needed=2048)
    assert fault is not None
    assert (fault.what, fault.path, fault.errno) == (
        WORLD_ERRNOS[number],
        "/data/out/f.part",
        number,
    )
    line = fault.line()
    assert line.startswith(f"{WORLD_ERRNOS[number]}: cannot write /data/out/f.part; 2.0 KiB more")
    assert errno.errorcode[number] in line
    assert "Nothing is lost and no attempt was spent" in line
    assert "\n" not in line


@pytest.mark.parametrize("number", [errno.ENOENT, errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG])
def test_other_os_errors_are_not_faults_of_the_world(number: int) -> None:
    exc = OSError(number, os.strerror(number), "/data/out/f.part")
    assert not is_world_error(exc)
    assert fault_of(exc) is None
