"""The helper's fork server on its own link (helper/forkserver.py, fork_loop.c), driven
as daemon/forkserver.py drives it: a request forks a helper, answered with its pid and
a pidfd; its end is reported with its wait status; a malformed request is answered and
the server goes on; the link's end ends the server. And between two forks the server
writes (almost) no page: each page it writes is copied, and the copy it leaves behind is
the helper forked last's alone; nor does it leave free chunks in its C heap for a
helper's allocations to copy.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helperlink import SOFTHSM_SO, SoftHSMDir
from p11p.protocol.framing import FrameDecoder

CKR_OK = 0
CKR_GENERAL_ERROR = 5


class Server:
    """A fork server process and the daemon's end of its link."""

    def __init__(self, env: dict[str, str]) -> None:
        self.link, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p11p.helper.forkserver", str(os.getpid()), "m"],
            stdin=theirs, env={**os.environ, **env})
        theirs.close()
        self.pipes: dict[int, tuple[int, int]] = {}  # helper pid: its stdin, its stdout
        assert self.receive()[0] == [0, self.proc.pid]

    def send(self, message: Any, fds: list[int]) -> None:
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.link.sendmsg([msgpack.packb(message)], ancdata)

    def receive(self, timeout: float = 10.0) -> tuple[Any, list[int]]:
        assert select.select([self.link], [], [], timeout)[0], "no message from the server"
        data, ancdata, _, _ = self.link.recvmsg(1 << 16, socket.CMSG_SPACE(16))
        fds = array.array("i")
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
        return (msgpack.unpackb(data) if data else None), list(fds)

    def fork(self, number: int, module: str = SOFTHSM_SO, rv: int = CKR_OK) -> int:
        """A helper, forked and ready (its ready frame says `rv`); its pid."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        self.send([number, module], [in_r, out_w])
        os.close(in_r)
        os.close(out_w)
        message, fds = self.receive()
        assert message[0] == number and message[1] > 0 and len(fds) == 1, message
        pid = message[1]
        os.close(fds[0])  # its pidfd
        self.pipes[pid] = (in_w, out_r)
        ready = self.frame(pid)
        assert ready[:2] == [0, rv] and (rv != CKR_OK or ready[2] == pid), ready
        return pid

    def frame(self, pid: int) -> Any:
        decoder = FrameDecoder()
        out = self.pipes[pid][1]
        while True:
            assert select.select([out], [], [], 10.0)[0], "no frame from the helper"
            frames = decoder.feed(os.read(out, 1 << 16))
            if frames:
                return frames[0]

    def end_helper(self, pid: int) -> None:
        """Closes the helper's stdin: it finalizes its module and exits."""
        in_w, out_r = self.pipes.pop(pid)
        os.close(in_w)
        os.close(out_r)

    def stop(self) -> None:
        for pid in list(self.pipes):
            self.end_helper(pid)
        self.link.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    hsm = SoftHSMDir(tmp_path)
    s = Server(hsm.env)
    yield s
    s.stop()


def test_a_request_forks_a_helper_whose_end_is_reported(server: Server) -> None:
    pid = server.fork(1)
    assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
        == server.proc.pid
    server.end_helper(pid)
    message, fds = server.receive()
    assert message[:2] == [-1, pid] and not fds
    assert os.waitstatus_to_exitcode(message[2]) == 0


def test_a_malformed_request_is_answered_and_the_server_goes_on(server: Server) -> None:
    r, w = os.pipe()
    try:
        server.send([7, SOFTHSM_SO], [r])  # one fd, not two
        assert server.receive()[0] == [7, 0, "malformed fork request"]
        server.send([8, 123], [r, w])  # not a module path
        assert server.receive()[0] == [8, 0, "malformed fork request"]
        server.send([10], [r, w])
        assert server.receive()[0] == [10, 0, "malformed fork request"]
        server.send([11, SOFTHSM_SO, 1], [r, w])
        assert server.receive()[0] == [11, 0, "malformed fork request"]
        server.send(["x"], [r, w])  # no number to answer: nothing comes back
        server.send(b"\xc1", [])  # not msgpack
    finally:
        os.close(r)
        os.close(w)
    assert server.fork(9) > 0  # the next answer is this one's


def test_a_module_that_does_not_load_is_reported_by_its_helper(server: Server) -> None:
    module = "/nonexistent/" + "m" * 300 + ".so"  # a longer msgpack string
    pid = server.fork(1, module, rv=CKR_GENERAL_ERROR)
    message, _ = server.receive()
    assert message[:2] == [-1, pid] and os.waitstatus_to_exitcode(message[2]) == 1


def _caught(pid: int) -> int:
    """The signals the process catches (a mask: bit n-1 for signal n)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    raise LookupError(pid)


def test_sigterm_ends_the_server_and_a_helper_has_it_as_its_default(server: Server) -> None:
    """The server catches SIGCHLD and SIGTERM (in C: no Python runs for them); a helper
    is a process of its own for both, as one started by the daemon is."""
    server_caught = _caught(server.proc.pid)
    assert server_caught & (1 << (signal.SIGCHLD - 1)) and \
        server_caught & (1 << (signal.SIGTERM - 1))
    pid = server.fork(1)
    assert not _caught(pid) & (1 << (signal.SIGCHLD - 1) | 1 << (signal.SIGTERM - 1))
    server.end_helper(pid)
    assert server.receive()[0][:2] == [-1, pid]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0


def test_the_links_end_ends_the_server(server: Server) -> None:
    pid = server.fork(1)
    server.end_helper(pid)
    server.link.close()
    assert server.proc.wait(10) == 0


def _frames(pid: int) -> dict[int, int]:
    """The physical frame of each present page of the process's private writable
    mappings (/proc/PID/pagemap: frame numbers need CAP_SYS_ADMIN, else read as 0)."""
    frames = {}
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split()
            if not fields[1].startswith("rw") or fields[1][3] != "p":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(start // 4096 * 8)
            data = pagemap.read((end - start) // 4096 * 8)
            for i, entry in enumerate(struct.unpack(f"{len(data) // 8}Q", data)):
                if entry >> 63:
                    frames[start + i * 4096] = entry & ((1 << 55) - 1)
    return frames


def test_the_server_writes_almost_no_page_between_two_forks(server: Server) -> None:
    """A page the server writes after a fork is copied (copy on write), and the copy left
    behind is the helper forked last's alone: a server loop in Python wrote some 90
    pages (the reference counts of what it touched), the loop in C its stack and its
    buffers (from Python 3.13, and the at-fork callbacks: about 20)."""
    server.fork(1)
    time.sleep(0.2)
    before = _frames(server.proc.pid)
    if not any(before.values()):
        pytest.skip("page frame numbers need CAP_SYS_ADMIN")
    server.fork(2)
    after = _frames(server.proc.pid)
    copied = [a for a, frame in before.items() if after.get(a, frame) != frame]
    assert len(copied) < (16 if sys.version_info < (3, 13) else 40), len(copied)


FILL = """
import ctypes
from p11p.helper.ffi import lib
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(n) for n in range(16, 4096, 8) for _ in range(4)]
for b in blocks[::2]:
    libc.free(b)
before = libc.mallinfo2()
lib.p11p_fork_fill_heap()
after = libc.mallinfo2()
print(before.ordblks, before.smblks, after.ordblks, after.smblks)
"""


def test_the_server_leaves_no_hole_in_the_c_heap_for_a_helper_to_fill() -> None:
    """What a helper allocates comes from fresh pages at the top of the C heap, not
    from the server's free chunks (each a page copied for a few bytes): the server
    takes them all before it serves (p11p_fork_fill_heap; glibc 2.33 or later)."""
    r = subprocess.run([sys.executable, "-c", FILL], capture_output=True, text=True,
                       timeout=60, check=True)
    free_before, _, free_after, fast_after = map(int, r.stdout.split())
    assert free_before > 100  # holes made (the top is one of the free chunks counted)
    assert (free_after, fast_after) == (1, 0)  # the top alone
