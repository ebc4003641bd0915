"""Client connections: framing, the hello, and one call at a time per connection.

Transport only: bytes in, frames out, replies written back. What a call means is the
dispatcher's business. A malformed or oversized frame, or a hello that does not fit,
closes this connection with one log line; the daemon goes on serving everybody else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from p11p.daemon.context import ApplicationContext
from p11p.protocol.constants import CKR
from p11p.protocol.framing import FrameDecoder, ProtocolError, encode

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.server")
PROTOCOL_VERSION = 1
_CREDS = struct.Struct("3i")


class ClientConnection(asyncio.Protocol):
    """One socket of one application."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.decoder = FrameDecoder(daemon.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.ctx: ApplicationContext | None = None
        self.pid = self.uid = self.gid = -1
        self._queue: deque[Any] = deque()
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()  # once: each look-up costs a getpid()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
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
            else:
                self._queue.append(frame)
        if self._queue and (self._task is None or self._task.done()):
            self._task = self._loop.create_task(self._serve())

    def _hello(self, frame: Any) -> bool:
        ok = (isinstance(frame, dict) and frame.get("p11p") == PROTOCOL_VERSION
              and isinstance(frame.get("ctx"), bytes) and len(frame["ctx"]) == 16
              and isinstance(frame.get("pid", 0), int) and isinstance(frame.get("prog", ""), str))
        assert self.transport is not None
        if not ok:
            version = frame.get("p11p") if isinstance(frame, dict) else None
            why = (f"protocol version {version} not supported" if isinstance(version, int)
                   and version != PROTOCOL_VERSION else "malformed hello")
            self.transport.write(encode({"p11p": PROTOCOL_VERSION, "error": why}))
            self._drop(why)
            return False
        refusal = self.daemon.admit(self.pid, self.uid, self.gid)
        if refusal:
            self.transport.write(encode({"p11p": PROTOCOL_VERSION, "error": refusal}))
            self._drop(refusal)
            return False
        self.ctx = self.daemon.attach(self.pid, self.uid, self.gid, frame["ctx"],
                                      str(frame.get("prog", ""))[:200])
        self.transport.write(encode({"p11p": PROTOCOL_VERSION}))
        return True

    async def _serve(self) -> None:
        dispatch = self.daemon.dispatcher.dispatch
        queue = self._queue
        while queue and self.transport is not None and not self.transport.is_closing():
            request = queue.popleft()
            ctx = self.ctx
            assert ctx is not None
            try:
                reply = await dispatch(ctx, request)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s internal error in call %r", ctx.name,
                              request[0] if request else None)
                reply = [CKR["CKR_FUNCTION_FAILED"]]
            try:
                data = encode(reply)
            except (TypeError, ValueError, OverflowError):
                log.exception("%s unencodable reply", ctx.name)
                data = encode([CKR["CKR_FUNCTION_FAILED"]])
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)

    def _drop(self, why: str) -> None:
        log.warning("closing connection pid=%d uid=%d: %s", self.pid, self.uid, why)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.ctx is not None:
            self.daemon.detach(self.ctx)
            self.ctx = None
