"""Client connections: framing, the hello, and one call at a time per connection.

Transport only: bytes in, frames out, replies written back. What a call means is the
dispatcher's business. A malformed or oversized frame, or a hello that does not fit,
closes this connection with one log line; the daemon goes on serving everybody else.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import struct
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from p11p.daemon import hello
from p11p.daemon.context import ApplicationContext
from p11p.protocol.constants import CKR
from p11p.protocol.framing import FrameDecoder, ProtocolError, encode

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.server")
_CREDS = struct.Struct("3i")
# the answer to a call a daemon stopping for a restart did not begin: the client library
# sends it again to the next daemon (protocol/README.md, "Daemon restarts")
RETRY = [0x80000000 | 0x70110002]  # CKR_VENDOR_DEFINED | 0x70110002 (client/link.h)
# (uid, offered range) of the version refusals already logged at warning level
_VERSION_REFUSALS_LOGGED: set[tuple[int, tuple[int, int] | None]] = set()


class ClientConnection(asyncio.Protocol):
    """One socket of one application."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.decoder = FrameDecoder(daemon.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.ctx: ApplicationContext | None = None
        # what the hello agreed on (daemon/hello.py); 0 until then
        self.version = 0
        self.features: tuple[str, ...] = ()
        self.pid = self.uid = self.gid = -1
        self._queue: deque[Any] = deque()
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()  # once: each look-up costs a getpid()
        # the calls of this connection run in a context of its own (the agreed features,
        # each call's budget), one at a time: begun here, or in a task once one waits
        self._context = contextvars.copy_context()

    @property
    def busy(self) -> bool:
        """A call of this connection is under way."""
        return self._task is not None and not self._task.done()

    def close(self) -> None:
        """Closes the connection; for a restart, an idle one with a last RETRY: a call is
        at most one per connection, and one sent that this daemon did not read yet takes
        it as its answer (an AF_UNIX peer reads what was written before the close)."""
        if self.transport is not None:
            if self._retry() and not self.busy:
                self._answer(RETRY)
            self.transport.close()

    def _retry(self) -> bool:
        """The daemon stops for a restart: a call not begun is sent back ("retry") to a
        client library that sends it to the next daemon; an older one's is served."""
        return self.daemon.leaving and "restart" in self.features

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.daemon.connections.add(self)
        self.transport = cast(asyncio.Transport, transport)
        sock = self.transport.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            self.pid, self.uid, self.gid = _CREDS.unpack(raw)
        except (OSError, AttributeError):
            log.warning("connection without peer credentials refused")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self._drop(str(exc))
            return
        for frame in frames:
            if self.ctx is None:
                if not self._hello(frame):
                    return
            elif not isinstance(frame, list) or not frame:
                self._drop("a request must be a non-empty array")
                return
            elif self._retry():
                self._answer(RETRY)
            else:
                self._queue.append(frame)
        if self._queue and (self._task is None or self._task.done()):
            self._serve_now()

    def _hello(self, frame: Any) -> bool:
        outcome, answer = hello.negotiate(frame)
        assert self.transport is not None
        if isinstance(outcome, hello.Refusal):
            self.transport.write(encode(answer))
            if outcome.offered is not None:
                self._refuse_version(outcome)
            else:
                self._drop(outcome.why)
            return False
        refusal = self.daemon.admit(self.pid, self.uid, self.gid)
        if refusal:
            self.transport.write(encode(hello.refusal_answer(refusal)))
            self._drop(refusal)
            return False
        self.version, self.features = outcome.version, outcome.features
        if "client_open" in outcome.features:
            # the library opens sessions itself while it has fewer than this
            answer["max_sessions"] = self.daemon.config.max_sessions_per_app
        if "restart" in outcome.features:
            # how long the library waits for a restarted daemon (the longest hold_timeout)
            answer["hold_ms"] = int(1000 * max(
                (g.config.hold_timeout for g in self.daemon.groups), default=10.0))
        self._context.run(hello.AGREED.set, self.features)  # the calls see them
        self.ctx = self.daemon.attach(self.pid, self.uid, self.gid, outcome.ctx, outcome.prog,
                                      outcome.resume)
        if "resume" in outcome.features and self.daemon.resume.enabled:
            # the state file's key: a daemon that cannot get it from a helper gets it
            # from the library (hello "resume", daemon/resume.py)
            answer["key"] = self.ctx.state_key
        self.transport.write(encode(answer))
        return True

    def _refuse_version(self, refusal: hello.Refusal) -> None:
        """Closes a connection whose client speaks no version this daemon speaks (after
        the answer is written); logged once per user and offered range, then at debug
        level, so a client that tries again on every call does not fill the log."""
        key = (self.uid, refusal.offered)
        level = logging.DEBUG if key in _VERSION_REFUSALS_LOGGED else logging.WARNING
        if len(_VERSION_REFUSALS_LOGGED) < 1024:
            _VERSION_REFUSALS_LOGGED.add(key)
        log.log(level, "closing connection pid=%d uid=%d: %s", self.pid, self.uid, refusal.why)
        if self.transport is not None:
            self.transport.close()

    def _serve_now(self) -> None:
        """Runs the queued calls here, each up to its first wait: a call answered without
        one (most answers of policy: a session opened or closed, a cached search) costs
        no task and no turn of the loop. The first call that waits goes on in a task,
        which then serves the rest of the queue."""
        queue = self._queue
        while queue and self.transport is not None and not self.transport.is_closing():
            if self._retry():
                self._answer(RETRY)
                queue.popleft()
                continue
            call = self._call(queue.popleft())
            try:
                waits_for = self._context.run(call.send, None)
            except StopIteration:
                continue
            self._task = self._loop.create_task(self._resume(call, waits_for),
                                                context=self._context)
            return

    async def _resume(self, call: Coroutine[Any, Any, None], waits_for: Any) -> None:
        """Drives a call begun in `_serve_now` from its first wait on, as a task would
        (the call takes each awaited result itself; a cancellation is thrown into it),
        then serves the rest of the queue."""
        while True:
            try:
                if waits_for is None:
                    await asyncio.sleep(0)  # a bare yield: a turn of the loop
                else:
                    # as a task takes a future a call yields: it was marked as awaited
                    # by the call (a second await of it would refuse)
                    waits_for._asyncio_future_blocking = False
                    await waits_for
                send: Any = call.send
                arg: BaseException | None = None
            except asyncio.CancelledError as exc:
                send, arg = call.throw, exc
            except Exception:  # noqa: BLE001 - the call reads the outcome itself
                send, arg = call.send, None
            try:
                waits_for = send(arg)
            except StopIteration:
                break
        await self._serve()

    async def _serve(self) -> None:
        queue = self._queue
        while queue and self.transport is not None and not self.transport.is_closing():
            if self._retry():
                self._answer(RETRY)
                queue.popleft()
                continue
            await self._call(queue.popleft())

    async def _call(self, request: Any) -> None:
        """One call: dispatched, its reply written."""
        ctx = self.ctx
        assert ctx is not None
        before = self.daemon.resume.mark(ctx)
        try:
            reply = await self.daemon.dispatcher.dispatch(ctx, request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s internal error in call %r", ctx.name,
                          request[0] if request else None)
            reply = [CKR["CKR_FUNCTION_FAILED"]]
        # the state file follows; some replies wait for it (daemon/resume.py)
        self.daemon.resume.answer(ctx, request, before, lambda: self._answer(reply))

    def _answer(self, reply: list[Any]) -> None:
        try:
            data = encode(reply)
        except (TypeError, ValueError, OverflowError):
            log.exception("unencodable reply")
            data = encode([CKR["CKR_FUNCTION_FAILED"]])
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _drop(self, why: str) -> None:
        log.warning("closing connection pid=%d uid=%d: %s", self.pid, self.uid, why)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.daemon.connections.discard(self)
        self.transport = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.ctx is not None:
            self.daemon.detach(self.ctx)
            self.ctx = None
