"""Converters between wire values and C arguments for the scalar, byte-string and
plain output kinds of protocol/README.md ("Argument kinds"). Templates, mechanisms and
the info structures have modules of their own; calls.py puts them all in one table.

A converter is (put, get). put(value, cargs) checks one wire value, appends the C
arguments it becomes to cargs and returns a state that lives until the call returns
(it keeps the buffers alive). get(state, rv) turns the state into the reply value after
the call; input kinds have no get. Every buffer and structure handed to the module
comes from ffi.new, which zeroes it; input bytes are passed in place (from_buffer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from p11p.helper.errors import BadArguments, TooLarge
from p11p.helper.ffi import ffi
from p11p.helper.settings import MAX_OUTPUT
from p11p.protocol.constants import CKR

Put = Callable[[Any, list[Any]], Any]
Get = Callable[[Any, int], Any]


class Converter(NamedTuple):
    put: Put
    get: Get | None


NULL = ffi.NULL
BYTES = ffi.typeof("unsigned char[]")
ULONGS = ffi.typeof("CK_ULONG[]")
ULONG_P = ffi.typeof("CK_ULONG *")
ULONG_SIZE = ffi.sizeof("CK_ULONG")
# The module's CK_ULONG range (the wire's is 64 bits).
ULONG_MAX = (1 << (8 * ULONG_SIZE)) - 1
# CK_UNAVAILABLE_INFORMATION as the module writes it, and as the wire carries it.
UNAVAILABLE_C = ULONG_MAX
UNAVAILABLE = (1 << 64) - 1
OK = CKR["CKR_OK"]
BUFFER_TOO_SMALL = CKR["CKR_BUFFER_TOO_SMALL"]


def ulong(v: Any, what: str = "an unsigned integer") -> int:
    """A wire integer that fits CK_ULONG (msgpack booleans are not integers here)."""
    if type(v) is not int or v < 0 or v > ULONG_MAX:
        raise BadArguments(f"expected {what}")
    return v


def capacity(v: Any, item_size: int = 1) -> int:
    """An output capacity (in items), lowered to what a reply frame can carry."""
    return min(ulong(v, "a capacity"), MAX_OUTPUT // item_size)


# -- inputs -----------------------------------------------------------------------------

def put_ulong(v: Any, cargs: list[Any]) -> None:
    if type(v) is not int or v < 0 or v > ULONG_MAX:
        raise BadArguments("expected an unsigned integer")
    cargs.append(v)


def put_bbool(v: Any, cargs: list[Any]) -> None:
    if type(v) is not int or (v != 0 and v != 1):
        raise BadArguments("expected a CK_BBOOL (0 or 1)")
    cargs.append(v)


def put_bytes(v: Any, cargs: list[Any]) -> Any:
    """bin: (pointer, length); nil: (NULL, 0); int: (NULL, that length)."""
    if type(v) is bytes:
        buf = ffi.from_buffer(BYTES, v)
        cargs += (buf, len(v))
        return buf
    if v is None:
        cargs += (NULL, 0)
    else:
        cargs += (NULL, ulong(v, "bin, nil or a length"))
    return None


def put_label32(v: Any, cargs: list[Any]) -> Any:
    if v is None:
        cargs.append(NULL)
        return None
    if type(v) is not bytes or len(v) != 32:
        raise BadArguments("a label is bin(32) or nil")
    buf = ffi.from_buffer(BYTES, v)
    cargs.append(buf)
    return buf


# -- outputs ----------------------------------------------------------------------------

def put_out_bytes(v: Any, cargs: list[Any]) -> Any:
    """nil: a length query (NULL buffer); int: a buffer of that capacity (0 is a real,
    non-NULL, zero-length buffer)."""
    plen = ffi.new(ULONG_P)
    if v is None:
        cargs += (NULL, plen)
        return (None, plen, 0)
    cap = capacity(v)
    buf = ffi.new(BYTES, cap or 1)
    plen[0] = cap
    cargs += (buf, plen)
    return (buf, plen, cap)


def get_out_bytes(state: Any, rv: int) -> Any:
    buf, plen, cap = state
    if rv == OK:
        n = plen[0]
        if buf is None:
            return n
        return ffi.buffer(buf, n if n <= cap else cap)[:]
    if rv == BUFFER_TOO_SMALL:
        return plen[0]
    return None


def put_out_random(v: Any, cargs: list[Any]) -> Any:
    if v is None:
        cargs += (NULL, 0)
        return None
    n = ulong(v, "a length or nil")
    if n > MAX_OUTPUT:
        raise TooLarge(f"{n} random bytes do not fit a reply frame")
    buf = ffi.new(BYTES, n or 1)
    cargs += (buf, n)
    return (buf, n)


def get_out_random(state: Any, rv: int) -> Any:
    if rv != OK or state is None:
        return None
    return ffi.buffer(state[0], state[1])[:]


def put_out_ulong(v: Any, cargs: list[Any]) -> Any:
    """A CK_ULONG_PTR (handle, slot, size): nil for NULL, else 0."""
    if v is None:
        cargs.append(NULL)
        return None
    if type(v) is not int or v != 0:
        raise BadArguments("an output pointer is nil or 0")
    p = ffi.new(ULONG_P)
    cargs.append(p)
    return p


def get_out_ulong(state: Any, rv: int) -> Any:
    return state[0] if rv == OK and state is not None else None


def put_out_ulongs(v: Any, cargs: list[Any]) -> Any:
    """A list of CK_ULONG with its count (slots, mechanisms): nil is a count query."""
    pcount = ffi.new(ULONG_P)
    if v is None:
        cargs += (NULL, pcount)
        return (None, pcount, 0)
    cap = capacity(v, ULONG_SIZE)
    arr = ffi.new(ULONGS, cap or 1)
    pcount[0] = cap
    cargs += (arr, pcount)
    return (arr, pcount, cap)


def get_out_ulongs(state: Any, rv: int) -> Any:
    arr, pcount, cap = state
    if rv == OK:
        n = pcount[0]
        if arr is None:
            return n
        return ffi.unpack(arr, n if n <= cap else cap)
    if rv == BUFFER_TOO_SMALL:
        return pcount[0]
    return None


def put_out_objects(v: Any, cargs: list[Any]) -> Any:
    """C_FindObjects: (array, max, pcount); nil for a NULL array."""
    pcount = ffi.new(ULONG_P)
    if v is None:
        cargs += (NULL, 0, pcount)
        return None
    cap = capacity(v, ULONG_SIZE)
    arr = ffi.new(ULONGS, cap or 1)
    cargs += (arr, cap, pcount)
    return (arr, pcount, cap)


def get_out_objects(state: Any, rv: int) -> Any:
    if rv != OK or state is None:
        return None
    arr, pcount, cap = state
    n = pcount[0]
    return ffi.unpack(arr, n if n <= cap else cap)


CONVERTERS: dict[str, Converter] = {
    "ulong": Converter(put_ulong, None),
    "slot": Converter(put_ulong, None),
    "session": Converter(put_ulong, None),
    "object": Converter(put_ulong, None),
    "bbool": Converter(put_bbool, None),
    "bytes": Converter(put_bytes, None),
    "pin": Converter(put_bytes, None),
    "label32": Converter(put_label32, None),
    "out_bytes": Converter(put_out_bytes, get_out_bytes),
    "out_random": Converter(put_out_random, get_out_random),
    "out_ulong": Converter(put_out_ulong, get_out_ulong),
    "out_slot": Converter(put_out_ulong, get_out_ulong),
    "out_session": Converter(put_out_ulong, get_out_ulong),
    "out_object": Converter(put_out_ulong, get_out_ulong),
    "out_slots": Converter(put_out_ulongs, get_out_ulongs),
    "out_mechs": Converter(put_out_ulongs, get_out_ulongs),
    "out_objects": Converter(put_out_objects, get_out_objects),
}
