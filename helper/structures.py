"""The info-structure output kinds (out_info, out_slot_info, out_token_info,
out_mech_info, out_session_info): nil for a NULL pointer, else 0 and a zeroed structure
for the module to fill; the reply is the structure's fields as an array, in the order
of protocol/README.md ("Structures"): CK_VERSION as [major, minor], fixed-size strings
as bin of the field's size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from p11p.helper.errors import BadArguments
from p11p.helper.ffi import ffi
from p11p.helper.kinds import NULL, OK, Converter


def _version(v: Any) -> list[int]:
    return [v.major, v.minor]


def _bin(field: Any) -> bytes:
    data: bytes = ffi.buffer(field)[:]
    return data


def _info(p: Any) -> list[Any]:
    return [_version(p.cryptokiVersion), _bin(p.manufacturerID), p.flags,
            _bin(p.libraryDescription), _version(p.libraryVersion)]


def _slot_info(p: Any) -> list[Any]:
    return [_bin(p.slotDescription), _bin(p.manufacturerID), p.flags,
            _version(p.hardwareVersion), _version(p.firmwareVersion)]


def _token_info(p: Any) -> list[Any]:
    return [_bin(p.label), _bin(p.manufacturerID), _bin(p.model), _bin(p.serialNumber),
            p.flags, p.ulMaxSessionCount, p.ulSessionCount, p.ulMaxRwSessionCount,
            p.ulRwSessionCount, p.ulMaxPinLen, p.ulMinPinLen, p.ulTotalPublicMemory,
            p.ulFreePublicMemory, p.ulTotalPrivateMemory, p.ulFreePrivateMemory,
            _version(p.hardwareVersion), _version(p.firmwareVersion), _bin(p.utcTime)]


def _mech_info(p: Any) -> list[Any]:
    return [p.ulMinKeySize, p.ulMaxKeySize, p.flags]


def _session_info(p: Any) -> list[Any]:
    return [p.slotID, p.state, p.flags, p.ulDeviceError]


def _converter(ctype: str, fields: Callable[[Any], list[Any]]) -> Converter:
    pointer = ffi.typeof(f"{ctype} *")

    def put(v: Any, cargs: list[Any]) -> Any:
        if v is None:
            cargs.append(NULL)
            return None
        if type(v) is not int or v != 0:
            raise BadArguments("an output structure is nil or 0")
        p = ffi.new(pointer)
        cargs.append(p)
        return p

    def get(state: Any, rv: int) -> Any:
        return fields(state) if rv == OK and state is not None else None

    return Converter(put, get)


CONVERTERS: dict[str, Converter] = {
    "out_info": _converter("CK_INFO", _info),
    "out_slot_info": _converter("CK_SLOT_INFO", _slot_info),
    "out_token_info": _converter("CK_TOKEN_INFO", _token_info),
    "out_mech_info": _converter("CK_MECHANISM_INFO", _mech_info),
    "out_session_info": _converter("CK_SESSION_INFO", _session_info),
}
