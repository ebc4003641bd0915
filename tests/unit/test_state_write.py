"""How a state file is written (daemon/resume.py, _write): whole, 0600, in the old one's
place at once: the new file is swapped with the old one (renameat2 RENAME_EXCHANGE),
which is then removed; where the file system cannot swap, it is renamed over it. A .tmp
a kill left behind is replaced by the next write. Real files in the test's directory."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from p11p.daemon import resume


class _Libc:
    """The C library, with renameat2's calls counted, or refused with `refuse`."""

    def __init__(self, refuse: int = 0) -> None:
        self.real = ctypes.CDLL(None, use_errno=True)
        self.refuse = refuse
        self.calls: list[int] = []

    def renameat2(self, *args: Any) -> int:
        if self.refuse:
            ctypes.set_errno(self.refuse)
            rv = -1
        else:
            rv = self.real.renameat2(*args)
        self.calls.append(rv if rv == 0 else -ctypes.get_errno())
        return int(rv)


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> _Libc:
    spy = _Libc()
    monkeypatch.setattr(resume, "_libc", spy)
    monkeypatch.setattr(resume, "_swaps", [True])
    return spy


def _listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


def test_a_state_file_takes_the_old_one_s_place_whole(tmp_path: Path, libc: _Libc) -> None:
    path = tmp_path / "1-ab.state"
    resume._write(path, b"first")
    old_inode = path.stat().st_ino
    resume._write(path, b"second" * 1000)
    assert _listing(tmp_path) == {"1-ab.state": b"second" * 1000}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != old_inode  # a new file, not the old one rewritten
    if libc.calls[-1] != 0:
        pytest.skip(f"this file system cannot swap files ({errno.errorcode[-libc.calls[-1]]})")
    # the first write had nothing to swap with (ENOENT: renamed); the second swapped
    assert libc.calls == [-errno.ENOENT, 0]
    assert resume._swaps == [True]


def test_a_tmp_a_kill_left_is_replaced_by_the_next_write(tmp_path: Path, libc: _Libc) -> None:
    """A kill between the swap and the unlink leaves the old state in the .tmp, with
    whatever mode: the next write makes its own."""
    path = tmp_path / "1-ab.state"
    resume._write(path, b"old")
    (tmp_path / "1-ab.tmp").write_bytes(b"older")
    os.chmod(tmp_path / "1-ab.tmp", 0o644)
    resume._write(path, b"new")
    assert _listing(tmp_path) == {"1-ab.state": b"new"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("refused", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_where_files_cannot_be_swapped_they_are_renamed(tmp_path: Path, monkeypatch:
                                                        pytest.MonkeyPatch, refused: int) -> None:
    spy = _Libc(refuse=refused)
    monkeypatch.setattr(resume, "_libc", spy)
    monkeypatch.setattr(resume, "_swaps", [True])
    path = tmp_path / "groups.state"
    for data in (b"a", b"bb", b"ccc"):
        resume._write(path, data)
        assert _listing(tmp_path) == {"groups.state": data}
    assert spy.calls == [-refused]  # asked once, then renames only
    assert resume._swaps == [False]


def test_a_swap_that_fails_otherwise_is_an_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other error is the write's (Resume.save logs it): the old file stays."""
    path = tmp_path / "1-ab.state"
    path.write_bytes(b"old")
    monkeypatch.setattr(resume, "_libc", _Libc(refuse=errno.EACCES))
    monkeypatch.setattr(resume, "_swaps", [True])
    with pytest.raises(PermissionError):
        resume._write(path, b"new")
    assert path.read_bytes() == b"old"
