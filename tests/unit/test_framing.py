"""The frame codec, fed bytes (no sockets): round trips, splits, limits, malformed input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from p11p.protocol.framing import FrameDecoder, ProtocolError, encode

VECTORS = [
    ([31, 7, b"\x01\x02", 64], "00000008" "941f07c40201024" "0"),
    ([0, None], "00000003" "9200c0"),
    ({"p11p": 1}, "00000007" "81a4703131700" "1"),
]


@pytest.mark.parametrize("obj, hexframe", VECTORS)
def test_golden_frames(obj, hexframe: str) -> None:  # type: ignore[no-untyped-def]
    frame = bytes.fromhex(hexframe.replace(" ", ""))
    assert encode(obj) == frame
    assert FrameDecoder().feed(frame) == [obj]


values = st.recursive(
    st.none() | st.integers(0, 2**64 - 1) | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=5), max_leaves=20)


@given(st.lists(values, min_size=1, max_size=5), st.integers(1, 7))
def test_any_split_gives_the_same_frames(objs, step: int) -> None:  # type: ignore[no-untyped-def]
    data = b"".join(encode(o) for o in objs)
    d = FrameDecoder()
    got = []
    for i in range(0, len(data), step):
        got += d.feed(data[i:i + step])
    assert got == objs and d.pending == 0


def test_oversized_frame_is_refused_before_reading_it() -> None:
    d = FrameDecoder(max_frame=100)
    with pytest.raises(ProtocolError, match="exceeds"):
        d.feed(struct.pack(">I", 101))


@pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01", b"\x01\x02", b"\x81\x01\x02"])
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_str_and_bin_stay_apart() -> None:
    (obj,) = FrameDecoder().feed(encode(["text", b"bytes"]))
    assert obj == ["text", b"bytes"] and isinstance(obj[0], str) and isinstance(obj[1], bytes)
    assert msgpack.packb(b"x", use_bin_type=True)[0] == 0xC4
