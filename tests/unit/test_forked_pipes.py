"""A forked helper's pipes joined to the event loop (daemon/forkserver.py,
ForkedTransport.connect): a helper start given up at any point of the joining (the
application ended, a background login cancelled) closes each pipe once, by its owner.

Found by make soak (failover-96): cancelled inside uvloop's pipe set-up, the old code
closed an fd the loop owned (EBADF), and ten seconds later uvloop refused a new pipe on
that fd number (FileExistsError): a helper could not start, an application call got an
internal error. Real pipes and a real child process, on uvloop as the daemon runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from types import SimpleNamespace

import uvloop
from p11p.daemon.forkserver import ForkedTransport


class _Protocol(asyncio.SubprocessProtocol):
    def __init__(self) -> None:
        self.exited = False

    def process_exited(self) -> None:
        self.exited = True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _start_and_give_up(loop: asyncio.AbstractEventLoop, turns: int) -> bool:
    """Joins a sleeping child's pipes, cancelled after `turns` turns of the loop. Whether
    the joining was still running when cancelled."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    server = SimpleNamespace(_loop=loop, children={}, gone=False)
    forked = ForkedTransport(server, child.pid, os.pidfd_open(child.pid))  # type: ignore[arg-type]
    server.children[child.pid] = forked
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    task = loop.create_task(forked.connect(_Protocol(), in_w, out_r))
    for _ in range(turns):
        await asyncio.sleep(0)
    running = not task.done()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    if not running:  # joined: the start is given up as HelperProcess.start does
        forked.close()
    for _ in range(1000):  # the joining finishes in the loop, then kills
        if child.poll() is not None:
            break
        await asyncio.sleep(0.01)
    assert child.poll() is not None and child.returncode < 0  # killed, joined or not
    forked.ended(None)
    for _ in range(5):  # the loop closes what it owns at its next turns
        await asyncio.sleep(0)
    os.close(in_r)
    os.close(out_w)
    return running


async def _many() -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    await _start_and_give_up(loop, 1)  # the loop's own fds for children come at the first
    before = _open_fds()
    cancelled_inside = 0
    for turns in list(range(1, 9)) * 3:  # 1: cancelled at its first wait
        cancelled_inside += await _start_and_give_up(loop, turns)
    await asyncio.sleep(0.05)
    leaked = _open_fds() - before
    # the loop still takes new pipes on whatever fd numbers came free
    for _ in range(20):
        r, w = os.pipe2(os.O_CLOEXEC)
        transport, _ = await loop.connect_read_pipe(asyncio.Protocol, os.fdopen(r, "rb", 0))
        transport.close()
        os.close(w)
        await asyncio.sleep(0)
    return leaked, cancelled_inside


def test_a_start_given_up_while_its_pipes_join_closes_each_once() -> None:
    leaked, cancelled_inside = uvloop.run(_many())
    assert cancelled_inside > 0  # some were cancelled in the middle of the joining
    assert leaked == 0
