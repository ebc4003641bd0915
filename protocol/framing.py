"""Frames: a 4-byte big-endian length, then one msgpack object. Sans-IO.

Both links (client ⇄ daemon, daemon ⇄ helper) use this. The decoder is fed bytes and
yields objects; it never touches a socket, so it is tested with plain bytes.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


class ProtocolError(Exception):
    """A frame that breaks the protocol; the connection that sent it is closed."""


def encode(obj: Any) -> bytes:
    """One frame holding ``obj``."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> Any:
    """The one msgpack object in a frame body (strict: bin stays bytes, no trailing data)."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
        raise ProtocolError(f"malformed frame body: {exc}") from exc


class FrameDecoder:
    """Turns a byte stream into frame bodies, enforcing the size limit."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Add received bytes; return the objects of every frame now complete."""
        buf = self._buf
        if not buf and len(data) > HEADER_SIZE:
            # the common case, one whole frame in one read: decoded in place, no copy
            (size,) = _HEADER.unpack_from(data, 0)
            if size + HEADER_SIZE == len(data) and size <= self.max_frame:
                with memoryview(data) as view:
                    return [decode_body(view[HEADER_SIZE:])]
        buf += data
        out: list[Any] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > self.max_frame:
                raise ProtocolError(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
            if end - pos - HEADER_SIZE < size:
                break
            start = pos + HEADER_SIZE
            with memoryview(buf) as view:
                out.append(decode_body(view[start:start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)
