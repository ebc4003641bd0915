"""One helper process, seen from the daemon: start, multiplexed calls, time-outs, stop.

The helper speaks frames over its stdin/stdout (protocol/README.md, "Helper link").
Calls are matched to replies by call id, so many calls are in flight at once. A helper
that exits, breaks the protocol or passes a call's time-out fails every pending call
with MemberUnavailable; the caller (the HA policy) decides what happens next.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from p11p.daemon import forkserver
from p11p.daemon.errors import MemberUnavailable
from p11p.protocol.constants import CKR, rv_name
from p11p.protocol.framing import FrameDecoder, ProtocolError, encode
from p11p.protocol.spec import own_codes

if TYPE_CHECKING:
    from p11p.daemon.members import MemberHealth

log = logging.getLogger("p11p.helper")

START_TIMEOUT = 30.0  # a start outside an application call (warm pool, recovery)
_OWN = own_codes()
PING = _OWN["PING"].code
# The helper's own codes for the data plane (helper/loop.py, helper/fast.c)
FAST_START, FAST_ALLOW, FAST_REVOKE, FAST_SERVED, FAST_STUCK = (
    _OWN[n].code for n in ("FAST_START", "FAST_ALLOW", "FAST_REVOKE", "FAST_SERVED", "FAST_STUCK"))
# A helper that outlives the daemon, and what it kept (helper/loop.py; daemon/resume.py)
ADOPTABLE, KEPT, KEEP = _OWN["ADOPTABLE"].code, _OWN["KEPT"].code, _OWN["KEEP"].code
RECYCLE = _OWN["RECYCLE"].code
C_FINALIZE = 2


class HelperLimit(Exception):
    """The daemon runs as many helpers as `max_helpers` allows."""


class CallTimedOut(MemberUnavailable):
    """A member call (or a helper's start) outlived its deadline; the helper is killed.
    The member is failed by it (DESIGN: a hang is the member's own health)."""


class HelperProcess(asyncio.SubprocessProtocol):
    """A running helper for one member (and, once taken, one application context)."""

    live = 0  # helpers started and not yet exited, daemon-wide
    limit = 512  # [daemon] max_helpers
    adopt_wait = 0.0  # [daemon] adopt_timeout: an application's helper outlives the daemon

    def __init__(self, member: str, max_frame: int) -> None:
        self.member = member
        self.pid = 0
        self.alive = False
        # kept: asyncio.get_running_loop() costs a getpid() system call each time
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self._decoder = FrameDecoder(max_frame + 1024)
        self._pending: dict[int, asyncio.Future[list[Any]]] = {}
        self._next_id = 1
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._why = "helper exited"
        self.stopping = False  # the daemon ended it: not a failure
        self.on_death: Callable[[str], None] | None = None  # told when it dies by itself
        self.fast: tuple[bytes, bytes] | None = None  # data plane listening: (name, token)
        self.fast_started: asyncio.Future[bool] | None = None  # its start, once
        self.fast_served = 0  # its direct calls already added to the member's count
        self.fast_name: bytes | None = None  # its listener's name, kept when it serves another
        # what its data plane takes beyond one request at a time (its ready frame:
        # helper/settings.py PLANE_FEATURES), which DIRECT_BIND passes on
        self.plane_features: frozenset[str] = frozenset()
        self.pool_epoch = -1  # its member's pool epoch when it started (HelperPool.recycle)
        self.uses = 0  # applications it served (HelperPool.recycle)
        # ADOPTABLE: (abstract socket name, token) a restarted daemon takes it back with
        self.adopt: tuple[bytes, bytes] | None = None
        self._adoptable: asyncio.Future[list[Any]] | None = None  # its answer, once sent

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    async def start(cls, member: str, module: str, env: dict[str, str], max_frame: int,
                    timeout: float = START_TIMEOUT) -> HelperProcess:
        """A helper whose module is loaded and initialized within `timeout`; past it
        (or when the start is cancelled) the process is killed: none is left behind."""
        if cls.live >= cls.limit:
            log.warning("helper limit reached: %d helpers run (max_helpers); member=%s",
                        cls.live, member)
            raise HelperLimit(member)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        full_env = dict(os.environ)
        full_env.update(env)
        full_env["P11P_MAX_FRAME"] = str(max_frame)  # the helper bounds its output buffers by it
        try:
            forked = await forkserver.spawn(member, module, full_env, timeout)
        except TimeoutError:
            raise CallTimedOut(member, f"helper did not start in {timeout:.3g} s") from None
        if forked is None:  # no fork server: a process of its own
            transport, proto = await loop.subprocess_exec(
                lambda: cls(member, max_frame), sys.executable, "-m", "p11p.helper", module,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
                env=full_env, preexec_fn=forkserver.own_group)
            proto.pid = transport.get_pid()
        else:
            child, in_w, out_r = forked
            proto = cls(member, max_frame)
            await child.connect(proto, in_w, out_r)
            proto.pid = child.get_pid()
        try:
            await asyncio.wait_for(asyncio.shield(proto.ready), max(0.0, deadline - loop.time()))
        except TimeoutError:
            proto.kill()
            raise CallTimedOut(member, f"helper did not start in {timeout:.3g} s") from None
        except BaseException:  # the module failed to load, or the start was cancelled
            proto.kill()
            raise
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio's classes, only alike
        self._transport = cast(asyncio.SubprocessTransport, transport)
        self._stdin = cast(asyncio.WriteTransport, self._transport.get_pipe_transport(0))
        self.alive = True
        HelperProcess.live += 1

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._fail(f"protocol error from helper: {exc}")
            self.kill()
            return
        pending = self._pending
        for frame in frames:
            if not isinstance(frame, list) or len(frame) < 2 or not isinstance(frame[0], int):
                self._fail("malformed reply from helper")
                self.kill()
                return
            call_id = frame[0]
            if call_id == 0:
                self._on_ready(frame)
                continue
            fut = pending.pop(call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(frame)

    def _on_ready(self, frame: list[Any]) -> None:
        if self.ready.done():
            return
        if frame[1] == CKR["CKR_OK"]:
            # what its data plane's request header carries (helper/settings.py)
            features = frame[3] if len(frame) > 3 and isinstance(frame[3], list) else []
            self.plane_features = frozenset(f for f in features if isinstance(f, str))
            self.ready.set_result(None)
        else:
            detail = frame[2] if len(frame) > 2 else ""
            self._why = f"module failed to load: {rv_name(frame[1])} {detail}"
            self.ready.set_exception(MemberUnavailable(self.member, self._why, frame[1]))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self._fail(self._why)

    def process_exited(self) -> None:
        code = self._transport.get_returncode() if self._transport else None
        if code is not None and code < 0:
            try:
                self._why = f"helper killed by {signal.Signals(-code).name}"
            except ValueError:
                self._why = f"helper killed by signal {-code}"
        elif code:
            self._why = f"helper exited with status {code}"
        self._fail(self._why)
        if not self.exited.done():
            HelperProcess.live -= 1
            self.exited.set_result(code or 0)
        if not self.stopping and self.ready.done() and self.on_death is not None:
            self.on_death(self._why)

    def _fail(self, why: str, kind: type[MemberUnavailable] = MemberUnavailable) -> None:
        self.alive = False
        self._why = why
        error = kind(self.member, why)
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # mark retrieved
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    def kill(self) -> None:
        self.stopping = True
        if self._transport is not None and self._transport.get_returncode() is None:
            try:
                self._transport.kill()
            except ProcessLookupError:
                pass

    async def stop(self, timeout: float = 5.0) -> None:
        """Finalizes the module (C_Finalize, then closing stdin: an adoptable helper
        takes EOF for its daemon's end) and waits; kills past the time-out."""
        self.stopping = True
        if self.adopt is not None and self.alive:
            _quiet(self.send([C_FINALIZE]))
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            self.kill()
            await asyncio.shield(self.exited)
        if self._transport is not None:
            self._transport.close()

    # -- outliving the daemon ------------------------------------------------------------

    def make_adoptable(self, app_pid: int, key: bytes) -> None:
        """Tells the helper (application `app_pid`'s now) to outlive this daemon, for
        `adopt_wait` seconds and no longer than the application, on a name and token of
        its own, and to keep `key` (the application's state file's) for the next one.
        The reply is not waited for: frames keep their order on the pipe."""
        if self.adopt_wait <= 0 or self.adopt is not None or not self.alive:
            return
        token = secrets.token_bytes(16)
        self.adopt = (f"p11p-helper-{self.pid}-{token[:4].hex()}".encode(), token)
        fut = self.send([ADOPTABLE, self.adopt[0], token, os.getuid(),
                         max(1, int(self.adopt_wait * 1000)), app_pid, key])
        fut.add_done_callback(self._adoptable_done)
        self._adoptable = fut

    async def outlives(self, timeout: float) -> bool:
        """Whether the helper said it outlives this daemon (its ADOPTABLE answer,
        waited for up to `timeout`): a daemon that stops asks before it leaves it, else
        a helper told just before the stop may still die with its fork server."""
        if self.adopt is None or self._adoptable is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(self._adoptable), timeout)
        except Exception:  # noqa: BLE001 - timed out, or the helper died: it does not
            self.adopt = None
        return self.adopt is not None and self.alive

    def _adoptable_done(self, fut: asyncio.Future[list[Any]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        if fut.result()[1] != CKR["CKR_OK"]:
            log.warning("member=%s pid=%d cannot outlive the daemon: %s", self.member,
                        self.pid, rv_name(fut.result()[1]))
            self.adopt = None

    def leave(self) -> None:
        """The daemon goes and this helper stays for the next one: nothing is sent and
        its end is no failure."""
        self.stopping = True

    async def keep(self, user_type: int, pin: bytes, timeout: float) -> bool:
        """Gives the helper a login to keep for the next daemon."""
        return bool((await self.call([KEEP, user_type, pin], timeout))[0] == CKR["CKR_OK"])

    async def kept(self, timeout: float) -> tuple[bytes | None, tuple[int, bytes] | None]:
        """What the helper kept for this daemon: the application's state file key, and
        (user type, PIN) of its last good C_Login here."""
        reply = await self.call([KEPT], timeout)
        if reply[0] != CKR["CKR_OK"] or len(reply) < 2 or not isinstance(reply[1], bytes):
            return None, None
        if len(reply) == 4 and isinstance(reply[2], int) and isinstance(reply[3], bytes):
            return reply[1], (reply[2], reply[3])
        return reply[1], None

    # -- calls ------------------------------------------------------------------------

    def send(self, request: list[Any]) -> asyncio.Future[list[Any]]:
        """Sends `[code, arg...]`; the future gives `[call_id, rv, out...]`."""
        fut: asyncio.Future[list[Any]] = self._loop.create_future()
        if not self.alive or self._stdin is None or self._stdin.is_closing():
            fut.set_exception(MemberUnavailable(self.member, self._why))
            return fut
        call_id = self._next_id
        self._next_id = call_id + 1 if call_id < 0x7FFFFFFF else 1
        self._pending[call_id] = fut
        try:
            self._stdin.write(encode([call_id, *request]))
        except (RuntimeError, OSError) as exc:  # the pipe closed under us: it died
            self._fail(f"helper pipe closed: {exc}")
        return fut

    async def call(self, request: list[Any], timeout: float | None) -> list[Any]:
        """One call; returns `[rv, out...]`. Past `timeout` the helper is killed
        (CallTimedOut)."""
        fut = self.send(request)
        if timeout is None:
            reply = await fut
        else:
            timer = self._loop.call_later(timeout, self._expire, fut, timeout)
            try:
                reply = await fut
            finally:
                timer.cancel()
        return reply[1:]

    async def count_direct(self, health: MemberHealth) -> None:
        """Adds the calls served on the data plane since the last count to `health`."""
        served = await self.direct_served()
        health.calls_served += served
        health.direct_served += served

    async def direct_served(self) -> int:
        """Calls served on the data plane since the last time asked (0 when it does
        not listen, or is gone)."""
        if self.fast is None or not self.alive:
            return 0
        try:
            reply = await self.call([FAST_SERVED], 5.0)
        except MemberUnavailable:
            return 0
        if reply[0] != 0 or not isinstance(reply[1], int) or reply[1] < self.fast_served:
            return 0
        delta = reply[1] - self.fast_served
        self.fast_served = reply[1]
        return delta

    def _expire(self, fut: asyncio.Future[list[Any]], timeout: float) -> None:
        if fut.done():
            return
        self._why = f"call exceeded call_timeout ({timeout:.3g} s); helper killed"
        log.warning("member=%s pid=%d %s", self.member, self.pid, self._why)
        self._fail(self._why, CallTimedOut)  # the pending calls report the failure
        self.kill()

    async def direct_stuck(self, timeout: float) -> float:
        """Seconds the oldest direct call in flight has been inside the module (0: none).
        CallTimedOut when the helper does not answer within `timeout`."""
        reply = await self.call([FAST_STUCK], timeout)
        if reply[0] != 0 or not isinstance(reply[1], int):
            return 0.0
        return float(reply[1]) / 1000.0

    @property
    def why(self) -> str:
        return self._why

    @property
    def in_flight(self) -> int:
        return len(self._pending)


def _quiet(fut: asyncio.Future[list[Any]]) -> None:
    """A reply nobody waits for: its failure is no news."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


class _SocketLink(asyncio.Protocol):
    """The adoption socket of a helper a previous daemon started, as its pipes."""

    def __init__(self, helper: AdoptedHelper) -> None:
        self.helper = helper

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.helper.linked(cast(asyncio.WriteTransport, transport))

    def data_received(self, data: bytes) -> None:
        self.helper.pipe_data_received(1, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.helper.unlinked()


class AdoptedHelper(HelperProcess):
    """A helper that outlived the daemon that started it, taken back over its adoption
    socket (daemon/resume.py). Not this process's child: it is signalled by pidfd, and
    its end is the end of the socket."""

    def __init__(self, member: str, max_frame: int, pid: int, adopt: tuple[bytes, bytes] | None,
                 fast: tuple[bytes, bytes] | None, fast_name: bytes | None) -> None:
        super().__init__(member, max_frame)
        self.pid = pid
        self.adopt = adopt
        self._pidfd = -1
        # its data plane listens on as before (its bindings go on)
        self.fast, self.fast_name = fast, fast_name
        if fast is not None:
            self.fast_started = self._loop.create_future()
            self.fast_started.set_result(True)

    async def attach(self, timeout: float) -> None:
        """Connects, proves this daemon with the token and waits for the helper's ready
        frame; MemberUnavailable when it is gone or does not answer in time."""
        loop = asyncio.get_running_loop()
        assert self.adopt is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            self._pidfd = os.pidfd_open(self.pid)
            await asyncio.wait_for(loop.sock_connect(sock, b"\0" + self.adopt[0]), timeout)
            await asyncio.wait_for(loop.sock_sendall(sock, self.adopt[1]), timeout)
            await loop.create_unix_connection(lambda: _SocketLink(self), sock=sock)
            await asyncio.wait_for(asyncio.shield(self.ready), timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self._fail(f"not taken back: {exc!r}")
            self._close_pidfd()
            raise MemberUnavailable(self.member, f"helper pid={self.pid} not taken back: "
                                    f"{exc!r}") from None

    def linked(self, transport: asyncio.WriteTransport) -> None:
        self._stdin = transport
        self.alive = True
        HelperProcess.live += 1

    def unlinked(self) -> None:
        self._fail(self._why if self.stopping else "helper link closed")
        self._close_pidfd()
        if not self.exited.done():
            HelperProcess.live -= 1
            self.exited.set_result(0)
            if not self.stopping and self.ready.done() and self.on_death is not None:
                self.on_death(self._why)

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def kill(self) -> None:
        self.stopping = True
        if self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._stdin is not None:
            self._stdin.close()

    async def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        if self.alive:
            _quiet(self.send([C_FINALIZE]))
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.close()
        if not self.ready.done():
            self.kill()
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            self.kill()
