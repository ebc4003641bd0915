"""A fake p11p daemon for the client's transport tests.

It speaks the client link's framing and hello (protocol/README.md) and answers each
request with whatever the test's handler says: a reply object, raw bytes, a delay, no
answer at all, or a closed connection. It is not a PKCS#11 mock: it only exercises the
client's transport (connect, hello, framing, time-outs, pool, reconnect, fork, shutdown).
Every connection is recorded (its hello, its requests, when it closed) for the tests.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

CKR_OK = 0
CKR_NO_EVENT = 0x8
CKR_FUNCTION_NOT_SUPPORTED = 0x54
FN_FINALIZE = 2
FN_GET_SLOT_LIST = 5
FN_SIGN = 44
FN_WAIT_FOR_SLOT_EVENT = 68


@dataclass
class Raw:
    """Bytes sent as they are (frame header included); then the connection closes when
    close is set."""

    data: bytes
    close: bool = False


@dataclass
class Delay:
    """Wait, then answer with reply."""

    seconds: float
    reply: Any


class Hold:
    """Never answer; keep the connection open until the client closes it."""


class Close:
    """Close the connection without an answer."""


@dataclass
class Conn:
    """One client connection as the daemon saw it."""

    number: int
    hello: dict[str, Any] | None = None
    requests: list[list[Any]] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


Handler = Callable[[Conn, list[Any]], Any]


def default_handler(conn: Conn, request: list[Any]) -> Any:
    """C_GetSlotList answers the connection's number as the slot count (so a test sees
    which connection carried a call); C_WaitForSlotEvent blocks unless CKF_DONT_BLOCK."""
    code = request[0]
    if code == FN_GET_SLOT_LIST:
        return [CKR_OK, conn.number]
    if code == FN_FINALIZE:
        return [CKR_OK]
    if code == FN_WAIT_FOR_SLOT_EVENT:
        return [CKR_NO_EVENT, None] if request[1] & 1 else Hold()
    return [CKR_FUNCTION_NOT_SUPPORTED]


class FakeDaemon:
    """Listens on path; one thread per connection. hello: "ok", "silent", "refuse" or
    "version2", or the answer itself (a map: served on unless it holds "error")."""

    def __init__(self, path: Path, handler: Handler = default_handler,
                 hello: str | dict[str, Any] = "ok") -> None:
        self.path = Path(path)
        self.handler = handler
        self.hello = hello
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._stopping = threading.Event()

    def __enter__(self) -> FakeDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.path.exists():
            self.path.unlink()
        self._stopping.clear()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(64)
        threading.Thread(target=self._accept, args=(self._sock,), daemon=True).start()

    def stop(self) -> None:
        """Stops listening and closes every connection (a daemon that went away)."""
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._open.clear()
        if self.path.exists():
            os.unlink(self.path)

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                s, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                conn = Conn(number=len(self.conns) + 1)
                self.conns.append(conn)
                self._open.append(s)
            threading.Thread(target=self._serve, args=(s, conn), daemon=True).start()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    @staticmethod
    def _read_exact(s: socket.socket, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = s.recv(n - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def _read_frame(self, s: socket.socket) -> Any:
        header = self._read_exact(s, 4)
        if header is None:
            return None
        body = self._read_exact(s, struct.unpack(">I", header)[0])
        if body is None:
            return None
        return msgpack.unpackb(body, raw=False)

    def _serve(self, s: socket.socket, conn: Conn) -> None:
        try:
            self._converse(s, conn)
        finally:
            conn.closed.set()
            with self._lock:
                if s in self._open:
                    self._open.remove(s)
            s.close()

    def _converse(self, s: socket.socket, conn: Conn) -> None:
        conn.hello = self._read_frame(s)
        if conn.hello is None:
            return
        if self.hello == "silent":
            self._read_exact(s, 1)  # until the client gives up
            return
        if self.hello == "refuse":
            s.sendall(frame({"p11p": 1, "error": "not allowed"}))
            return
        if isinstance(self.hello, dict):
            s.sendall(frame(self.hello))
            if "error" in self.hello:
                return
        else:
            s.sendall(frame({"p11p": 2 if self.hello == "version2" else 1}))
        while True:
            request = self._read_frame(s)
            if request is None:
                return
            conn.requests.append(request)
            action = self.handler(conn, request)
            if isinstance(action, Delay):
                time.sleep(action.seconds)
                action = action.reply
            if isinstance(action, Hold):
                self._read_exact(s, 1)
                return
            if isinstance(action, Close):
                return
            try:
                s.sendall(action.data if isinstance(action, Raw) else frame(action))
            except OSError:
                return
            if isinstance(action, Raw) and action.close:
                return
