"""Wire values to C arguments and C results back to wire values, one converter per
argument kind (protocol/README.md, "Argument kinds"). Built once per function.

Every buffer and structure handed to the module comes from ffi.new, which zeroes it.
A value of the wrong shape raises BadArgument; the caller answers CKR_ARGUMENTS_BAD.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from p11p.protocol import spec
from p11p.protocol.constants import CKR

ULONG_MAX = 2**64 - 1
UNAVAILABLE = ULONG_MAX
ARRAY_ATTRIBUTE = 0x40000000
# Only these hold nested attribute arrays (CKA_ALLOWED_MECHANISMS has the bit too but
# holds mechanism types).
NESTED = frozenset({0x40000211, 0x40000212, 0x40000213})
OK = CKR["CKR_OK"]
BUFFER_TOO_SMALL = CKR["CKR_BUFFER_TOO_SMALL"]
GET_ATTRIBUTE_RVS = frozenset({OK, CKR["CKR_ATTRIBUTE_SENSITIVE"],
                               CKR["CKR_ATTRIBUTE_TYPE_INVALID"], BUFFER_TOO_SMALL})


class BadArgument(Exception):
    """A wire value that does not fit its argument's kind."""


def _ulong(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= ULONG_MAX:
        raise BadArgument(f"expected an unsigned integer, got {type(v).__name__}")
    return v


class Converters:
    """Per-kind converters over one ffi; `prepare(kind)` gives (to_c, from_c)."""

    def __init__(self, ffi: Any) -> None:
        self.ffi = ffi
        self.NULL = ffi.NULL
        self.attr_size = ffi.sizeof("CK_ATTRIBUTE")
        self.mechs = spec.mechanisms()

    # -- inputs -----------------------------------------------------------------------
    # Each to_c(value, keep) returns the list of C arguments; `keep` holds Python objects
    # that must live until the call returns.

    def bytes_in(self, v: Any, keep: list[Any]) -> list[Any]:
        if type(v) is bytes:
            buf = self.ffi.from_buffer(v)
            keep.append(buf)
            return [buf, len(v)]
        if v is None:
            return [self.NULL, 0]
        return [self.NULL, _ulong(v)]

    def label32(self, v: Any, keep: list[Any]) -> list[Any]:
        if v is None:
            return [self.NULL]
        if type(v) is not bytes or len(v) != 32:
            raise BadArgument("a label is 32 bytes")
        buf = self.ffi.new("unsigned char[]", v)
        keep.append(buf)
        return [buf]

    def template(self, v: Any, keep: list[Any]) -> list[Any]:
        if v is None:
            return [self.NULL, 0]
        if type(v) is int:
            return [self.NULL, _ulong(v)]
        if type(v) is not list:
            raise BadArgument("a template is an array")
        return [self._attributes(v, keep, depth=0), len(v)]

    def _attributes(self, attrs: list[Any], keep: list[Any], depth: int) -> Any:
        if depth > 2:
            raise BadArgument("templates nest too deep")
        arr = self.ffi.new("CK_ATTRIBUTE[]", max(len(attrs), 1))
        keep.append(arr)
        for i, attr in enumerate(attrs):
            if type(attr) is not list or len(attr) != 2:
                raise BadArgument("an attribute is [type, value]")
            a = arr[i]
            a.type = _ulong(attr[0])
            value = attr[1]
            if type(value) is bytes:
                buf = self.ffi.from_buffer(value)
                keep.append(buf)
                a.pValue, a.ulValueLen = buf, len(value)
            elif value is None:
                a.pValue, a.ulValueLen = self.NULL, 0
            elif type(value) is list and attr[0] in NESTED:
                a.pValue = self._attributes(value, keep, depth + 1)
                a.ulValueLen = len(value) * self.attr_size
            else:
                a.pValue, a.ulValueLen = self.NULL, _ulong(value)
        return arr

    def mechanism(self, v: Any, keep: list[Any]) -> list[Any]:
        if v is None:
            return [self.NULL]
        if type(v) is not list or len(v) != 2:
            raise BadArgument("a mechanism is [type, param]")
        m = self.ffi.new("CK_MECHANISM *")
        keep.append(m)
        m.mechanism = _ulong(v[0])
        param = v[1]
        if param is None:
            m.pParameter, m.ulParameterLen = self.NULL, 0
        elif type(param) is bytes:
            buf = self.ffi.from_buffer(param)
            keep.append(buf)
            m.pParameter, m.ulParameterLen = buf, len(param)
        elif type(param) is list:
            known = self.mechs.get(m.mechanism)
            if known is None:
                raise BadArgument("structured parameter for a mechanism without one")
            m.pParameter, m.ulParameterLen = self._param(known.param, param, keep)
        else:
            raise BadArgument("a mechanism parameter is nil, bin or an array")
        return [m]

    def _param(self, ps: spec.ParamStruct, values: list[Any], keep: list[Any]) -> tuple[Any, int]:
        if len(values) != len(ps.fields):
            raise BadArgument(f"{ps.name} has {len(ps.fields)} fields")
        if ps.ctype == "CK_OBJECT_HANDLE":
            p = self.ffi.new("CK_OBJECT_HANDLE *", _ulong(values[0]))
            keep.append(p)
            return p, self.ffi.sizeof("CK_OBJECT_HANDLE")
        p = self.ffi.new(f"{ps.ctype} *")
        keep.append(p)
        for field, value in zip(ps.fields, values, strict=True):
            if field.kind in ("ulong", "object"):
                setattr(p, field.cnames[0], _ulong(value))
            elif field.kind == "bbool":
                setattr(p, field.cnames[0], 1 if _ulong(value) else 0)
            elif field.kind in ("fixed16", "fixed8"):
                size = 16 if field.kind == "fixed16" else 8
                if type(value) is not bytes or len(value) != size:
                    raise BadArgument(f"{field.cnames[0]} is {size} bytes")
                setattr(p, field.cnames[0], list(value))
            else:  # bytes: pointer + length
                ptr, length = self.bytes_in(value, keep)
                setattr(p, field.cnames[0], self.ffi.cast("unsigned char *", ptr))
                setattr(p, field.cnames[1], length)
        return p, self.ffi.sizeof(ps.ctype)

    # -- outputs ----------------------------------------------------------------------
    # to_c returns (C arguments, state); from_c(rv, state) gives the wire value.

    def out_bytes_c(self, v: Any, keep: list[Any]) -> tuple[list[Any], Any]:
        n = self.ffi.new("unsigned long *")
        if v is None:
            return [self.NULL, n], (None, n)
        n[0] = _ulong(v)
        buf = self.ffi.new("unsigned char[]", max(v, 1))
        return [buf, n], (buf, n)

    def out_bytes_r(self, rv: int, state: Any) -> Any:
        buf, n = state
        if rv == OK:
            return self.ffi.buffer(buf, n[0])[:] if buf is not None and n[0] <= len(buf) else n[0]
        return n[0] if rv == BUFFER_TOO_SMALL else None

    def out_random_c(self, v: Any, keep: list[Any]) -> tuple[list[Any], Any]:
        if v is None:
            return [self.NULL, 0], None
        buf = self.ffi.new("unsigned char[]", max(_ulong(v), 1))
        return [buf, v], (buf, v)

    def out_random_r(self, rv: int, state: Any) -> Any:
        return self.ffi.buffer(state[0], state[1])[:] if rv == OK and state is not None else None

    def out_ulong_c(self, v: Any, keep: list[Any]) -> tuple[list[Any], Any]:
        if v is None:
            return [self.NULL], None
        p = self.ffi.new("unsigned long *")
        return [p], p

    def out_ulong_r(self, rv: int, state: Any) -> Any:
        return int(state[0]) if rv == OK and state is not None else None

    def out_list_c(self, v: Any, keep: list[Any]) -> tuple[list[Any], Any]:
        n = self.ffi.new("unsigned long *")
        if v is None:
            return [self.NULL, n], (None, n)
        n[0] = _ulong(v)
        arr = self.ffi.new("unsigned long[]", max(v, 1))
        return [arr, n], (arr, n)

    def out_list_r(self, rv: int, state: Any) -> Any:
        arr, n = state
        if rv == OK:
            return list(arr[0:n[0]]) if arr is not None and n[0] <= len(arr) else n[0]
        return n[0] if rv == BUFFER_TOO_SMALL else None

    def out_objects_c(self, v: Any, keep: list[Any]) -> tuple[list[Any], Any]:
        n = self.ffi.new("unsigned long *")
        if v is None:
            return [self.NULL, 0, n], None
        arr = self.ffi.new("unsigned long[]", max(_ulong(v), 1))
        return [arr, v, n], (arr, n)

    def out_objects_r(self, rv: int, state: Any) -> Any:
        if rv != OK or state is None:
            return None
        arr, n = state
        return list(arr[0:min(n[0], len(arr))])

    def out_struct_c(self, ctype: str) -> Callable[[Any, list[Any]], tuple[list[Any], Any]]:
        def to_c(v: Any, keep: list[Any]) -> tuple[list[Any], Any]:
            if v is None:
                return [self.NULL], None
            p = self.ffi.new(f"{ctype} *")
            return [p], p
        return to_c

    def _version(self, v: Any) -> list[int]:
        return [v.major, v.minor]

    def _raw(self, field: Any) -> bytes:
        return bytes(self.ffi.buffer(field))

    def struct_r(self, kind: str) -> Callable[[int, Any], Any]:
        raw, ver = self._raw, self._version

        def info(p: Any) -> list[Any]:
            return [ver(p.cryptokiVersion), raw(p.manufacturerID), p.flags,
                    raw(p.libraryDescription), ver(p.libraryVersion)]

        def slot_info(p: Any) -> list[Any]:
            return [raw(p.slotDescription), raw(p.manufacturerID), p.flags,
                    ver(p.hardwareVersion), ver(p.firmwareVersion)]

        def token_info(p: Any) -> list[Any]:
            return [raw(p.label), raw(p.manufacturerID), raw(p.model), raw(p.serialNumber),
                    p.flags, p.ulMaxSessionCount, p.ulSessionCount, p.ulMaxRwSessionCount,
                    p.ulRwSessionCount, p.ulMaxPinLen, p.ulMinPinLen, p.ulTotalPublicMemory,
                    p.ulFreePublicMemory, p.ulTotalPrivateMemory, p.ulFreePrivateMemory,
                    ver(p.hardwareVersion), ver(p.firmwareVersion), raw(p.utcTime)]

        def mech_info(p: Any) -> list[Any]:
            return [p.ulMinKeySize, p.ulMaxKeySize, p.flags]

        def session_info(p: Any) -> list[Any]:
            return [p.slotID, p.state, p.flags, p.ulDeviceError]

        read = {"out_info": info, "out_slot_info": slot_info, "out_token_info": token_info,
                "out_mech_info": mech_info, "out_session_info": session_info}[kind]
        return lambda rv, p: read(p) if rv == OK and p is not None else None

    # -- C_GetAttributeValue ----------------------------------------------------------

    def template_get_c(self, v: Any, keep: list[Any]) -> tuple[list[Any], Any]:
        if v is None:
            return [self.NULL, 0], None
        if type(v) is int:
            return [self.NULL, _ulong(v)], None
        if type(v) is not list:
            raise BadArgument("a template is an array")
        arr = self._get_request(v, keep, 0)
        return [arr, len(v)], (arr, v)

    def _get_request(self, request: list[Any], keep: list[Any], depth: int) -> Any:
        if depth > 2:
            raise BadArgument("templates nest too deep")
        arr = self.ffi.new("CK_ATTRIBUTE[]", max(len(request), 1))
        keep.append(arr)
        for i, item in enumerate(request):
            if type(item) is not list or len(item) != 2:
                raise BadArgument("an attribute request is [type, cap]")
            a = arr[i]
            a.type = _ulong(item[0])
            cap = item[1]
            if cap is None:
                a.pValue, a.ulValueLen = self.NULL, 0
            elif type(cap) is list and item[0] in NESTED:
                a.pValue = self._get_request(cap, keep, depth + 1)
                a.ulValueLen = len(cap) * self.attr_size
            else:
                size = _ulong(cap)
                buf = self.ffi.new("unsigned char[]", max(size, 1))
                keep.append(buf)
                a.pValue, a.ulValueLen = buf, size
        return arr

    def template_get_r(self, rv: int, state: Any) -> Any:
        if rv not in GET_ATTRIBUTE_RVS or state is None:
            return None
        return self._get_values(*state)

    def _get_values(self, arr: Any, request: list[Any]) -> list[Any]:
        out: list[Any] = []
        for i, item in enumerate(request):
            a = arr[i]
            length = int(a.ulValueLen)
            cap = item[1]
            if length == UNAVAILABLE:
                out.append(UNAVAILABLE)
            elif cap is None:
                out.append(length // self.attr_size if item[0] in NESTED else length)
            elif type(cap) is list:
                inner = self.ffi.cast("CK_ATTRIBUTE *", a.pValue)
                count = min(length // self.attr_size, len(cap))
                values = self._get_values(inner, cap[:count])
                # the module writes the inner types as well: they travel with the values
                out.append([[int(inner[j].type), values[j]] for j in range(count)])
            elif length <= cap:
                out.append(self.ffi.buffer(a.pValue, length)[:])
            else:
                out.append(length)
        return out


INPUT_KINDS = {"ulong", "slot", "session", "object", "bbool"}


def plan(conv: Converters, fn: spec.Function) -> list[tuple[Any, Any]]:
    """For each travelling argument: (to_c, from_c or None)."""
    steps: list[tuple[Any, Any]] = []
    for arg in fn.wire_args:
        k = arg.kind
        if k in INPUT_KINDS:
            steps.append((None, None))  # a plain integer, checked by _ulong
        elif k in ("bytes", "pin"):
            steps.append((conv.bytes_in, None))
        elif k == "label32":
            steps.append((conv.label32, None))
        elif k == "template":
            steps.append((conv.template, None))
        elif k == "mechanism":
            steps.append((conv.mechanism, None))
        elif k == "out_bytes":
            steps.append((conv.out_bytes_c, conv.out_bytes_r))
        elif k == "out_random":
            steps.append((conv.out_random_c, conv.out_random_r))
        elif k in ("out_ulong", "out_slot", "out_session", "out_object"):
            steps.append((conv.out_ulong_c, conv.out_ulong_r))
        elif k in ("out_slots", "out_mechs"):
            steps.append((conv.out_list_c, conv.out_list_r))
        elif k == "out_objects":
            steps.append((conv.out_objects_c, conv.out_objects_r))
        elif k == "template_get":
            steps.append((conv.template_get_c, conv.template_get_r))
        elif k.startswith("out_"):
            ctype = {"out_info": "CK_INFO", "out_slot_info": "CK_SLOT_INFO",
                     "out_token_info": "CK_TOKEN_INFO", "out_mech_info": "CK_MECHANISM_INFO",
                     "out_session_info": "CK_SESSION_INFO"}[k]
            steps.append((conv.out_struct_c(ctype), conv.struct_r(k)))
        else:
            raise AssertionError(f"{fn.name}: kind {k}")
    return steps
