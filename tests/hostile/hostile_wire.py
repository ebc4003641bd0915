"""A raw client of the daemon's socket for the hostile-input tests: frames by hand, the
hello as protocol/README.md says, and replies read with a deadline, so that a daemon
that hangs fails the test instead of stalling it.

Nothing here goes through p11p-client.so: the point is to send what no well-behaved
client would.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
PROTOCOL_VERSION = 1
# A reply must come within this many seconds (the daemon's call_timeout in these tests
# is shorter, so a member call that hangs is answered before it).
REPLY_TIMEOUT = 20.0


class Closed(Exception):
    """The daemon closed the connection."""


class Hang(AssertionError):
    """No reply and no close within the deadline."""


def frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def hello_map(ctx: bytes, pid: int | None = None, prog: str = "hostile") -> dict[str, Any]:
    return {"p11p": PROTOCOL_VERSION, "ctx": ctx, "pid": os.getpid() if pid is None else pid,
            "prog": prog}


class Wire:
    """One AF_UNIX connection to the daemon."""

    def __init__(self, path: Path | str, timeout: float = REPLY_TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.timeout = timeout
        self._buf = bytearray()
        self.closed = False

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send_raw(self, data: bytes) -> bool:
        """False when the daemon has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False

    def send(self, obj: Any) -> bool:
        return self.send_raw(frame(obj))

    def _fill(self, need: int, deadline: float) -> None:
        while len(self._buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang(f"no reply within {self.timeout:g} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise Hang(f"no reply within {self.timeout:g} s") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                raise Closed()
            self._buf += chunk

    def recv(self, timeout: float | None = None) -> Any:
        """The next reply object; Closed when the daemon closed the connection, Hang
        when nothing came in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._fill(HEADER.size, deadline)
        (size,) = HEADER.unpack_from(self._buf)
        assert size <= 64 * 1024 * 1024, f"reply frame of {size} bytes"
        self._fill(HEADER.size + size, deadline)
        body = bytes(self._buf[HEADER.size:HEADER.size + size])
        del self._buf[:HEADER.size + size]
        return msgpack.unpackb(body, raw=False, strict_map_key=False)

    def hello(self, ctx: bytes) -> None:
        """The hello of a well-formed client; the daemon must accept it."""
        assert self.send(hello_map(ctx))
        answer = self.recv()
        assert answer == {"p11p": PROTOCOL_VERSION}, answer

    def call(self, request: list[Any], timeout: float | None = None) -> list[Any]:
        assert self.send(request), "connection closed before the call"
        reply = self.recv(timeout)
        assert is_reply(reply), reply
        return reply  # type: ignore[no-any-return]

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True when the daemon closes the connection within `timeout` (anything it
        still sends before that is read and dropped)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._buf.clear()
                self._fill(1, deadline)
        except Closed:
            return True
        except Hang:
            return False


def is_reply(obj: Any) -> bool:
    """A reply `[rv, out...]` with a CK_RV in 64-bit range."""
    return (type(obj) is list and len(obj) >= 1 and type(obj[0]) is int
            and 0 <= obj[0] < 2**64)
