"""The members' fork servers, seen from the daemon (helper/forkserver.py is the other end).

One fork server per member, started at the member's first helper start with the
environment its helpers get, forks that member's helpers: a new application costs a
fork, not an interpreter start. Per member, not per daemon, because the loader and libc
read some variables only when a process starts (LD_LIBRARY_PATH, LD_PRELOAD, MALLOC_*),
so a member's environment must be the server's own; and because a fork server that dies
takes its helpers along (PR_SET_PDEATHSIG), which must fail one member, not all.

A forked helper is seen by HelperProcess as a subprocess: frames over a pipe pair, its
pid, its exit status (reported by its fork server, which reaps it), killed through a
pidfd (never a reused pid). A fork server that dies is logged and started again at the
member's next helper start; one that cannot start sends its member's helpers back to
processes of their own (`spawn` gives None), logged once, tried again after RETRY.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import socket
import sys
import time
from typing import Any, cast

import msgpack

log = logging.getLogger("p11p.helper")

START_TIMEOUT = 30.0  # a fork server's own start, whoever waits for it
RETRY = 60.0  # seconds a member's helpers start the old way after its server failed to start
STOP_TIMEOUT = 5.0
MAX_MESSAGE = 1 << 16
ENDED = -1  # server -> daemon: a helper ended

enabled = True  # [daemon] fork_server
# by member name and environment: members of two groups may share a name, and a reload
# may change a member's environment (its server before stays, idle, until the daemon ends)
_servers: dict[tuple[str, frozenset[tuple[str, str]]], ForkServer] = {}
_running: set[ForkServer] = set()  # every server not yet gone (a stale one included)
_failed_until: dict[str, float] = {}


class ForkServerUnavailable(Exception):
    """The fork server cannot fork this helper (not started, gone, refused)."""


def own_group() -> None:
    """Run in a helper process (or fork server) before it executes: a process group of
    its own, so that a Ctrl-C at the daemon's terminal does not reach it (the daemon
    ends its helpers), in the daemon's session. Not a session of its own: the kernel's
    autogroup scheduling gives each session one share of the CPUs, and with one session
    per helper, calls on the data plane stalled for 100-690 ms now and then under an
    8-thread ECDSA load on 2 cores (none over 21 ms with the helpers in the daemon's
    session)."""
    os.setpgid(0, 0)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


async def spawn(member: str, module: str, env: dict[str, str], timeout: float
                ) -> tuple[ForkedTransport, int, int] | None:
    """A helper of `member` forked by its fork server, and the daemon's ends of its pipes
    (its stdin's write end, its stdout's read end); None when it is to start as a
    process of its own. TimeoutError past `timeout`."""
    if not enabled or time.monotonic() < _failed_until.get(member, 0.0):
        return None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    server = _servers.get((member, frozenset(env.items())))
    if server is not None and server.loop is not loop:  # of an event loop that has ended
        server = None
    if server is None:
        server = ForkServer(member, env)
        _servers[server.key] = server
        server.starting = loop.create_task(server.start(), context=contextvars.Context())
    assert server.starting is not None
    try:
        await asyncio.wait_for(asyncio.shield(server.starting), max(0.0, timeout))
        return await asyncio.wait_for(server.fork(module),
                                      max(0.0, deadline - loop.time()))
    except ForkServerUnavailable:
        return None


async def close_all() -> None:
    """Ends every fork server (the daemon stops; its helpers have been stopped)."""
    await asyncio.gather(*(s.close() for s in list(_running)), return_exceptions=True)
    _servers.clear()


def abandon_all() -> None:
    """Kills every fork server without waiting (the daemon stops for a restart: the
    applications' helpers, its children, no longer die with it and stay)."""
    for server in list(_running):
        server._leaving = True
        server.kill()
    _servers.clear()


class ForkServer:
    """One member's fork server process and its link."""

    def __init__(self, member: str, env: dict[str, str]) -> None:
        self.member = member
        self.env = env
        self.key = (member, frozenset(env.items()))
        self.pid = 0
        self.starting: asyncio.Task[None] | None = None
        self.loop = self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._exited: asyncio.Future[int | None] = self._loop.create_future()
        self._link: socket.socket | None = None
        self._process: asyncio.SubprocessTransport | None = None
        self._requests: dict[int, asyncio.Future[ForkedTransport]] = {}
        self.children: dict[int, ForkedTransport] = {}
        self._next = 1
        self.gone = False
        self._leaving = False  # closed by the daemon: its end is no news

    async def start(self) -> None:
        _running.add(self)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                transport, _ = await self._loop.subprocess_exec(
                    lambda: _ServerProcess(self), sys.executable, "-m", "p11p.helper.forkserver",
                    str(os.getpid()), self.member, stdin=theirs.fileno(), stdout=None,
                    stderr=None, env=self.env, preexec_fn=own_group)
            finally:
                theirs.close()
            self._process = transport
            self.pid = self._process.get_pid()
            ours.setblocking(False)
            self._link = ours
            self._loop.add_reader(ours.fileno(), self._readable)
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except BaseException as exc:
            if self._link is None:
                ours.close()
            why = "start timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            self._lost(why, quiet=True)
            self.kill()
            if isinstance(exc, asyncio.CancelledError):
                raise
            _failed_until[self.member] = time.monotonic() + RETRY
            log.warning("member=%s fork server cannot start (%s); its helpers start as "
                        "processes of their own for %.0f s", self.member, why, RETRY)
            raise ForkServerUnavailable(why) from None
        log.info("member=%s fork server started, pid=%d", self.member, self.pid)

    # -- requests ---------------------------------------------------------------------

    async def fork(self, module: str) -> tuple[ForkedTransport, int, int]:
        """A helper of `module`, with the server's environment (its key)."""
        if self.gone:
            raise ForkServerUnavailable("fork server gone")
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        number = self._next
        self._next += 1
        reply: asyncio.Future[ForkedTransport] = self._loop.create_future()
        self._requests[number] = reply
        try:
            try:
                # the helper's environment is the server's own (one server per environment)
                await self._send([number, module], [in_r, out_w])
            finally:
                os.close(in_r)
                os.close(out_w)
            return await reply, in_w, out_r
        except BaseException:
            self._requests.pop(number, None)
            os.close(in_w)
            os.close(out_r)
            raise

    async def _send(self, message: list[Any], fds: list[int]) -> None:
        data = msgpack.packb(message)
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            if self._link is None or self.gone:
                raise ForkServerUnavailable("fork server gone")
            try:
                self._link.sendmsg([data], ancdata)
                return
            except BlockingIOError:
                writable: asyncio.Future[None] = self._loop.create_future()
                fd = self._link.fileno()
                self._loop.add_writer(fd, _set_once, writable)
                try:
                    await writable
                finally:
                    self._loop.remove_writer(fd)
            except OSError as exc:
                raise ForkServerUnavailable(f"fork server link: {exc}") from None

    def _readable(self) -> None:
        while self._link is not None:
            try:
                data, ancdata, _, _ = self._link.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(f"its link failed: {exc}")
                return
            fds = _fds(ancdata)
            if not data:
                self._lost("its link closed")
            else:
                try:
                    message = msgpack.unpackb(data)
                except Exception:  # any packet that does not decode is malformed
                    message = None
                fds = self._message(message, fds)
            for fd in fds:
                os.close(fd)

    def _message(self, message: Any, fds: list[int]) -> list[int]:
        """Acts on one message; the fds it did not keep."""
        if not isinstance(message, list) or len(message) < 2 \
                or not all(isinstance(m, int) for m in message[:2]):
            log.error("member=%s fork server: malformed message; ignored", self.member)
            return fds
        number, pid = message[0], message[1]
        if number == 0:
            if not self._ready.done():
                self._ready.set_result(None)
        elif number == ENDED and len(message) == 3 and isinstance(message[2], int):
            child = self.children.get(pid)
            if child is not None:
                child.ended(message[2])
        elif number > 0:
            reply = self._requests.pop(number, None)
            if pid > 0 and len(fds) == 1:
                child = self.children[pid] = ForkedTransport(self, pid, fds.pop())
                if reply is None or reply.done():
                    child.kill()  # its start was given up meanwhile
                else:
                    reply.set_result(child)
            elif reply is not None and not reply.done():
                detail = message[2] if len(message) > 2 else "?"
                reply.set_exception(ForkServerUnavailable(f"fork refused: {detail}"))
        return fds

    # -- its end ----------------------------------------------------------------------

    def _lost(self, why: str, quiet: bool = False) -> None:
        if self.gone:
            return
        self.gone = True
        if _servers.get(self.key) is self:
            del _servers[self.key]
        if self._link is not None:
            self._loop.remove_reader(self._link.fileno())
            self._link.close()
            self._link = None
        if not quiet and not self._leaving:
            log.warning("member=%s fork server pid=%d ended (%s) with %d helpers; started again "
                        "at the next helper start", self.member, self.pid, why,
                        len(self.children))
        requests, self._requests = self._requests, {}
        for reply in requests.values():
            if not reply.done():
                reply.set_exception(ForkServerUnavailable(f"fork server ended ({why})"))
        for child in list(self.children.values()):
            child.server_gone()
        if self._exited.done():
            _running.discard(self)

    def exited(self, code: int | None) -> None:
        if not self._exited.done():
            self._exited.set_result(code)
        self._lost(f"exit status {code}")
        _running.discard(self)
        if self._process is not None:
            self._process.close()

    def kill(self) -> None:
        if self._process is not None and self._process.get_returncode() is None:
            try:
                self._process.kill()
            except ProcessLookupError:
                pass

    async def close(self) -> None:
        """Closes the link (the server leaves once its helpers have) and waits for it."""
        self._leaving = True
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()
        self._lost("closed")
        if self._process is None:
            _running.discard(self)
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), STOP_TIMEOUT)
        except TimeoutError:
            self.kill()
            await asyncio.shield(self._exited)


class _ServerProcess(asyncio.SubprocessProtocol):
    def __init__(self, server: ForkServer) -> None:
        self._server = server
        self._transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.SubprocessTransport, transport)

    def process_exited(self) -> None:
        code = self._transport.get_returncode() if self._transport else None
        self._server.exited(code)


class ForkedTransport:
    """A forked helper as HelperProcess sees a subprocess transport (pid, return code,
    stdin, kill, close). Its end comes from its fork server's report, with the status;
    once that server is gone (its helpers die with it), from its pidfd, status unknown."""

    def __init__(self, server: ForkServer, pid: int, pidfd: int) -> None:
        self._server = server
        self._loop = server._loop
        self._pid = pid
        self._pidfd = pidfd
        self._returncode: int | None = None
        self._ended = False
        self._dead = False  # its pidfd says it exited
        self._protocol: asyncio.SubprocessProtocol | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._stdout: asyncio.ReadTransport | None = None
        self._loop.add_reader(pidfd, self._pidfd_readable)

    async def connect(self, protocol: asyncio.SubprocessProtocol, in_w: int, out_r: int) -> None:
        """Joins the pipes to `protocol`, as a subprocess transport would. A start given
        up meanwhile (cancelled) lets the joining finish first, then closes and kills:
        cancelled inside the event loop's pipe set-up, the loop owns an fd that this code
        would close too (EBADF, or someone else's fd later: uvloop then refused a new
        pipe on that number with EEXIST; found by make soak, failover-96)."""
        joining = asyncio.ensure_future(self._join(protocol, in_w, out_r))
        try:
            await asyncio.shield(joining)
        except asyncio.CancelledError:
            joining.add_done_callback(self._given_up)
            raise
        if self._ended:
            self._loop.call_soon(protocol.process_exited)

    async def _join(self, protocol: asyncio.SubprocessProtocol, in_w: int, out_r: int) -> None:
        stdin_file, stdout_file = os.fdopen(in_w, "wb", buffering=0), os.fdopen(out_r, "rb", buffering=0)
        stdin: asyncio.WriteTransport | None = None
        try:
            stdin, _ = await self._loop.connect_write_pipe(lambda: _Pipe(protocol, 0), stdin_file)
            self._stdin = stdin
            self._protocol = protocol
            protocol.connection_made(cast(asyncio.SubprocessTransport, self))
            stdout, _ = await self._loop.connect_read_pipe(lambda: _Pipe(protocol, 1), stdout_file)
            self._stdout = stdout
        except BaseException:
            with contextlib.suppress(OSError):
                if stdin is not None:
                    stdin.close()  # its pipe is the transport's to close
                else:
                    stdin_file.close()
                stdout_file.close()
            self.kill()
            raise

    def _given_up(self, joining: asyncio.Future[None]) -> None:
        if not joining.cancelled() and joining.exception() is None:
            self.close()  # joined after all: its pipes close, and the helper is killed

    def get_pid(self) -> int:
        return self._pid

    def get_returncode(self) -> int | None:
        return self._returncode

    def get_pipe_transport(self, fd: int) -> asyncio.BaseTransport | None:
        return self._stdin if fd == 0 else self._stdout if fd == 1 else None

    def kill(self) -> None:
        if not self._ended and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass

    def close(self) -> None:
        for pipe in (self._stdin, self._stdout):
            if pipe is not None and not pipe.is_closing():
                pipe.close()
        self.kill()

    def ended(self, status: int | None) -> None:
        """It ended: `status` as waitpid gave it, None when unknown."""
        if self._ended:
            return
        self._ended = True
        if status is not None:  # as a subprocess's: negative for a signal
            self._returncode = os.waitstatus_to_exitcode(status)
        if not self._dead:
            self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        if self._server.children.get(self._pid) is self:
            del self._server.children[self._pid]
        if self._protocol is not None:
            self._protocol.process_exited()

    def _pidfd_readable(self) -> None:
        self._loop.remove_reader(self._pidfd)
        self._dead = True
        if self._server.gone:  # no report comes: its end is known, its status not
            self.ended(None)

    def server_gone(self) -> None:
        if self._dead:
            self.ended(None)


class _Pipe(asyncio.Protocol):
    """One of a forked helper's pipes, passed on to its HelperProcess."""

    def __init__(self, helper: asyncio.SubprocessProtocol, fd: int) -> None:
        self._helper = helper
        self._fd = fd

    def data_received(self, data: bytes) -> None:
        self._helper.pipe_data_received(self._fd, data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._helper.pipe_connection_lost(self._fd, exc)
