"""The `mechanism` kind: `[type, param]` to a CK_MECHANISM (protocol/README.md,
"Mechanisms"). param is nil (NULL), bin (plain bytes, any mechanism), or, for a
mechanism listed in protocol/mechanisms.spec, an array of its structure's fields, from
which the C structure is built field by field. Every buffer it points to stays alive in
the returned state until the call returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from p11p.helper.errors import BadArguments, Refused
from p11p.helper.ffi import ffi
from p11p.helper.kinds import BYTES, NULL, Converter, ulong
from p11p.protocol import spec
from p11p.protocol.constants import CKR

MECHANISM_P = ffi.typeof("CK_MECHANISM *")
# Builds one parameter structure from its wire fields: (pointer, size, buffers to keep).
Builder = Callable[[list[Any]], tuple[Any, int, list[Any]]]


def _field_setter(field: spec.Field) -> Callable[[Any, Any, list[Any]], None]:
    """A function that sets one field of a structure from its wire value."""
    kind, names = field.kind, field.cnames
    if kind in ("ulong", "object"):
        name = names[0]

        def set_ulong(p: Any, v: Any, keep: list[Any]) -> None:
            setattr(p, name, ulong(v, f"{name}: an unsigned integer"))
        return set_ulong
    if kind == "bbool":
        name = names[0]

        def set_bbool(p: Any, v: Any, keep: list[Any]) -> None:
            if type(v) is not int or (v != 0 and v != 1):
                raise BadArguments(f"{name}: a CK_BBOOL (0 or 1)")
            setattr(p, name, v)
        return set_bbool
    if kind in ("fixed16", "fixed8"):
        name, size = names[0], 16 if kind == "fixed16" else 8

        def set_fixed(p: Any, v: Any, keep: list[Any]) -> None:
            if type(v) is not bytes or len(v) != size:
                raise BadArguments(f"{name}: bin({size})")
            ffi.memmove(getattr(p, name), v, size)
        return set_fixed
    if kind == "bytes":
        pointer, length = names

        def set_bytes(p: Any, v: Any, keep: list[Any]) -> None:
            if type(v) is bytes:
                buf = ffi.from_buffer(BYTES, v)
                keep.append(buf)
                setattr(p, pointer, buf)
                setattr(p, length, len(v))
            elif v is not None:  # nil: NULL, 0 (the structure is zeroed)
                raise BadArguments(f"{pointer}: bin or nil")
        return set_bytes
    raise AssertionError(f"field kind {kind}")


def _builder(ps: spec.ParamStruct) -> Builder:
    if ps.ctype == "CK_OBJECT_HANDLE":  # the parameter is a handle itself (object:*)
        handle_p, handle_size = ffi.typeof("CK_OBJECT_HANDLE *"), ffi.sizeof("CK_OBJECT_HANDLE")

        def build_handle(values: list[Any]) -> tuple[Any, int, list[Any]]:
            if len(values) != 1:
                raise BadArguments(f"{ps.name} has 1 field")
            p = ffi.new(handle_p, ulong(values[0], "an object handle"))
            return p, handle_size, [p]
        return build_handle

    ctype_p, size = ffi.typeof(f"{ps.ctype} *"), ffi.sizeof(ps.ctype)
    setters = [_field_setter(f) for f in ps.fields]
    nfields = len(setters)

    def build(values: list[Any]) -> tuple[Any, int, list[Any]]:
        if len(values) != nfields:
            raise BadArguments(f"{ps.name} has {nfields} fields")
        p = ffi.new(ctype_p)
        keep: list[Any] = [p]
        for setter, value in zip(setters, values, strict=False):
            setter(p, value, keep)
        return p, size, keep
    return build


def _builders() -> dict[int, Builder]:
    by_struct = {ps.name: _builder(ps) for ps in spec.param_structs()}
    return {mtype: by_struct[m.param.name] for mtype, m in spec.mechanisms().items()}


BUILDERS = _builders()


def put_mechanism(v: Any, cargs: list[Any]) -> Any:
    if v is None:
        cargs.append(NULL)
        return None
    if type(v) is not list or len(v) != 2:
        raise BadArguments("a mechanism is [type, param] or nil")
    mtype, param = v
    m = ffi.new(MECHANISM_P)
    m.mechanism = ulong(mtype, "a mechanism type")
    keep: Any = None
    if type(param) is bytes:
        if mtype in BUILDERS:  # the module would follow pointers in these bytes
            raise Refused(CKR["CKR_MECHANISM_PARAM_INVALID"], "a structured parameter sent as bytes")
        keep = ffi.from_buffer(BYTES, param)
        m.pParameter = keep
        m.ulParameterLen = len(param)
    elif type(param) is list:
        build = BUILDERS.get(mtype)
        if build is None:
            raise BadArguments("a structured parameter for a mechanism without one")
        m.pParameter, m.ulParameterLen, keep = build(param)
    elif param is not None:
        raise BadArguments("a mechanism parameter is nil, bin or an array")
    cargs.append(m)
    return (m, keep)


CONVERTERS: dict[str, Converter] = {"mechanism": Converter(put_mechanism, None)}
