"""Raw Cryptoki calls through ctypes, for the calling-convention tests.

PyKCS11 and python-pkcs11 hide length queries, NULL pointers and buffer sizes; these
tests need to pass exactly what a C application passes. Function pointer signatures
come from protocol/functions.spec, so nothing here lists Cryptoki's functions again.
ctypes releases the GIL during a call, so threads really run concurrently.
"""

from __future__ import annotations

import ctypes as C
import os
from typing import Any

from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKF, CKM, CKR  # noqa: F401  (re-exported)

CK_ULONG = C.c_ulong
CK_BYTE_P = C.POINTER(C.c_ubyte)
_SCALAR = {"ulong": C.c_ulong, "slot": C.c_ulong, "session": C.c_ulong, "object": C.c_ulong,
           "bbool": C.c_ubyte}
_PAIR = {"bytes", "pin", "template", "template_get", "out_bytes", "out_random", "out_slots",
         "out_mechs", "notify"}


class CK_ATTRIBUTE(C.Structure):
    _fields_ = [("type", C.c_ulong), ("pValue", C.c_void_p), ("ulValueLen", C.c_ulong)]


class CK_MECHANISM(C.Structure):
    _fields_ = [("mechanism", C.c_ulong), ("pParameter", C.c_void_p),
                ("ulParameterLen", C.c_ulong)]


class CK_VERSION(C.Structure):
    _fields_ = [("major", C.c_ubyte), ("minor", C.c_ubyte)]


class CK_MECHANISM_INFO(C.Structure):
    _fields_ = [("ulMinKeySize", C.c_ulong), ("ulMaxKeySize", C.c_ulong), ("flags", C.c_ulong)]


class CK_C_INITIALIZE_ARGS(C.Structure):
    _fields_ = [("CreateMutex", C.c_void_p), ("DestroyMutex", C.c_void_p),
                ("LockMutex", C.c_void_p), ("UnlockMutex", C.c_void_p),
                ("flags", C.c_ulong), ("pReserved", C.c_void_p)]


def _argtypes(fn: spec.Function) -> list[Any]:
    types: list[Any] = []
    for arg in fn.args:
        if arg.kind in _SCALAR:
            types.append(_SCALAR[arg.kind])
        elif arg.kind == "out_objects":
            types += [C.c_void_p, C.c_ulong, C.c_void_p]
        elif arg.kind in _PAIR:
            second = C.c_void_p if arg.kind in ("out_bytes", "out_slots", "out_mechs", "notify") else C.c_ulong
            types += [C.c_void_p, second]
        else:
            types.append(C.c_void_p)
    return types


class Module:
    """A PKCS#11 module loaded with ctypes; `m.C_Sign(h, ...)` calls through its list."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.lib = C.CDLL(str(path))
        fl = C.c_void_p()
        rv = self.lib.C_GetFunctionList(C.byref(fl))
        assert rv == 0, rv
        table = C.cast(fl, C.POINTER(C.c_void_p))
        self._fns: dict[str, Any] = {}
        for fn in spec.functions():
            proto = C.CFUNCTYPE(C.c_ulong, *_argtypes(fn))
            # CK_FUNCTION_LIST: CK_VERSION (padded to a pointer) then the pointers.
            self._fns[fn.name] = proto(table[fn.code])

    def __getattr__(self, name: str) -> Any:
        try:
            return self._fns[name]
        except KeyError:
            raise AttributeError(name) from None

    # -- conveniences used by many tests ----------------------------------------------

    def initialize(self) -> int:
        args = CK_C_INITIALIZE_ARGS(flags=CKF["CKF_OS_LOCKING_OK"])
        return int(self.C_Initialize(C.byref(args)))

    def slots(self) -> list[int]:
        n = CK_ULONG()
        assert self.C_GetSlotList(1, None, C.byref(n)) == 0
        arr = (CK_ULONG * n.value)()
        assert self.C_GetSlotList(1, arr, C.byref(n)) == 0
        return list(arr[: n.value])

    def open_session(self, slot: int, rw: bool = True) -> int:
        h = CK_ULONG()
        flags = CKF["CKF_SERIAL_SESSION"] | (CKF["CKF_RW_SESSION"] if rw else 0)
        rv = self.C_OpenSession(slot, flags, None, None, C.byref(h))
        assert rv == 0, hex(rv)
        return h.value

    def login(self, session: int, pin: bytes) -> int:
        return int(self.C_Login(session, 1, pin, len(pin)))


def ulong_bytes(value: int) -> bytes:
    return value.to_bytes(C.sizeof(C.c_ulong), "little")


def template(*pairs: tuple[int, bytes | bool | int]) -> tuple[Any, int, list[Any]]:
    """A CK_ATTRIBUTE array from (type, value) pairs; keeps the buffers alive."""
    arr = (CK_ATTRIBUTE * len(pairs))()
    keep: list[Any] = []
    for i, (t, v) in enumerate(pairs):
        if isinstance(v, bool):
            raw = b"\x01" if v else b"\x00"
        elif isinstance(v, int):
            raw = ulong_bytes(v)
        else:
            raw = v
        buf = C.create_string_buffer(raw, len(raw))
        keep.append(buf)
        arr[i].type, arr[i].pValue, arr[i].ulValueLen = t, C.cast(buf, C.c_void_p), len(raw)
    return arr, len(pairs), keep


def mechanism(mech: int, param: bytes | None = None) -> tuple[CK_MECHANISM, Any]:
    if param is None:
        return CK_MECHANISM(mech, None, 0), None
    buf = C.create_string_buffer(param, len(param))
    return CK_MECHANISM(mech, C.cast(buf, C.c_void_p), len(param)), buf
