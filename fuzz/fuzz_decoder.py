"""Atheris fuzzer of the daemon's side of a client connection, without a token: the
frame decoder (p11p.protocol.framing) and the connection protocol (p11p.daemon.server
and .hello: the hello's negotiation, request checks, the queue of calls), fed arbitrary
bytes in arbitrary pieces.

What must hold for every input:
- FrameDecoder.feed raises nothing but ProtocolError, and gives the same objects
  whether the bytes come at once or in pieces;
- a ClientConnection (with a fake transport and a daemon whose dispatcher answers
  [CKR_OK]) raises nothing out of data_received or connection_lost, writes only whole
  frames that decode to a hello answer or a reply, and no exception reaches the event
  loop.

    python3 fuzz/fuzz_decoder.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports(include=["p11p.protocol", "p11p.daemon.server",
                                          "p11p.daemon.hello"]):
    import msgpack
    from p11p.daemon import server
    from p11p.protocol.framing import FrameDecoder, ProtocolError, decode_body

MAX_FRAME = 1 << 16
_errors: list[str] = []  # what reached the event loop or the log
_CREDS = struct.Struct("3i")


class _Escaped(Exception):
    """Something that must not happen happened (its message says what)."""


class _Logged(logging.Handler):
    """Notes every log record that carries an exception or an error."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            _errors.append(f"logged: {record.getMessage()}")


class _Socket:
    def getsockopt(self, level: int, name: int, size: int) -> bytes:
        return _CREDS.pack(1234, 1000, 1000)


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False

    def get_extra_info(self, name: str) -> Any:
        return _Socket() if name == "socket" else None

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after abort"
        self.out += data

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:  # what was written is still sent, then the socket closes
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


class _Context:
    name = "ctx=fuzz"
    closed = False


class _Dispatcher:
    async def dispatch(self, ctx: Any, request: list[Any]) -> list[Any]:
        return [0]


class _Config:
    max_frame = MAX_FRAME
    max_sessions_per_app = 64


class _Resume:
    """No state files: each reply goes out at once."""

    enabled = False

    def mark(self, ctx: Any) -> tuple[int, int, int]:
        return 0, 0, 0

    def answer(self, ctx: Any, request: Any, before: tuple[int, int, int],
               send: Callable[[], None]) -> None:
        send()


class _Daemon:
    """What daemon/server.py's ClientConnection uses of the daemon
    (daemon/service.py), with nothing behind it."""

    config = _Config()
    dispatcher = _Dispatcher()
    resume = _Resume()
    groups: list[Any] = []
    leaving = False

    def __init__(self) -> None:
        self.connections: set[Any] = set()

    def admit(self, pid: int, uid: int, gid: int) -> str | None:
        return None

    def attach(self, pid: int, uid: int, gid: int, ctx_id: bytes, prog: str,
               resume: Any = None) -> Any:
        assert type(ctx_id) is bytes and len(ctx_id) == 16 and type(prog) is str
        return _Context()

    def detach(self, ctx: Any) -> None:
        pass


def _pieces(data: bytes, cuts: bytes) -> list[bytes]:
    out, pos = [], 0
    for c in cuts:
        step = 1 + c % 32
        out.append(data[pos:pos + step])
        pos += step
    out.append(data[pos:])
    return [p for p in out if p]


def _same(a: list[Any], b: list[Any]) -> bool:
    return bool(msgpack.packb(a) == msgpack.packb(b))


def _decoder(data: bytes, cuts: bytes) -> None:
    whole: list[Any] | None
    try:
        whole = FrameDecoder(MAX_FRAME).feed(data)
    except ProtocolError:
        whole = None
    dec = FrameDecoder(MAX_FRAME)
    parts: list[Any] = []
    try:
        for piece in _pieces(data, cuts):
            parts += dec.feed(piece)
    except ProtocolError:
        if whole is not None:
            raise _Escaped("pieces broke the protocol where the whole did not") from None
        return
    if whole is None:
        raise _Escaped("the whole broke the protocol where the pieces did not")
    if not _same(whole, parts):
        raise _Escaped("pieces decode differently from the whole")


async def _connection(data: bytes, cuts: bytes) -> None:
    conn = server.ClientConnection(_Daemon())  # type: ignore[arg-type]
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    for piece in _pieces(data, cuts):
        if transport.closing:
            break
        conn.data_received(piece)
        await asyncio.sleep(0)
    if conn._task is not None:
        await asyncio.wait([conn._task], timeout=5)
        assert conn._task.done(), "a call never ended"
    conn.connection_lost(None)
    # what it wrote: whole frames, each a hello answer or a reply
    out, pos = bytes(transport.out), 0
    first = True
    while pos < len(out):
        assert len(out) - pos >= 4, "a partial frame header"
        (size,) = struct.unpack_from(">I", out, pos)
        assert len(out) - pos - 4 >= size, "a partial frame"
        obj = decode_body(out[pos + 4:pos + 4 + size])
        pos += 4 + size
        if first:
            assert type(obj) is dict and obj.get("p11p") == 1, obj
            first = False
        else:
            assert type(obj) is list and obj and type(obj[0]) is int, obj


_loop = asyncio.new_event_loop()


def _on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    _errors.append(str(context.get("message")) + " " + repr(context.get("exception")))


def test_one(data: bytes) -> None:
    cuts, data = data[:8], data[8:]
    _decoder(data, cuts)
    _loop.run_until_complete(_connection(data, cuts))
    if _errors:
        raise _Escaped("an exception escaped: " + _errors[0])


def main() -> None:
    logging.getLogger("p11p").addHandler(_Logged())
    logging.getLogger("p11p").setLevel(logging.WARNING)
    logging.getLogger("asyncio").addHandler(_Logged())
    _loop.set_exception_handler(_on_loop_error)
    asyncio.set_event_loop(_loop)
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
