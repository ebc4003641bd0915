"""Converters for attribute templates (protocol/README.md, "Attributes and templates"):
the input `template` kind and C_GetAttributeValue's in/out `template_get` kind, both
with nested templates (CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE, CKA_DERIVE_TEMPLATE),
which are CK_ATTRIBUTE arrays in C (length count * sizeof(CK_ATTRIBUTE)) and counts on
the wire. Only those three types hold attributes: CKA_ALLOWED_MECHANISMS has the array
bit too but is bytes, and a byte value is never given to the module as attributes.
"""

from __future__ import annotations

from typing import Any

from p11p.helper.errors import BadArguments, TooLarge
from p11p.helper.ffi import ffi
from p11p.helper.kinds import (
    BYTES,
    NULL,
    UNAVAILABLE,
    UNAVAILABLE_C,
    Converter,
    capacity,
    ulong,
)
from p11p.helper.settings import MAX_OUTPUT
from p11p.protocol.constants import CKA, CKR

NESTED = frozenset({CKA["CKA_WRAP_TEMPLATE"], CKA["CKA_UNWRAP_TEMPLATE"],
                    CKA["CKA_DERIVE_TEMPLATE"]})
MAX_DEPTH = 4  # template levels, the outer one included (as the client's limit)
ATTRS = ffi.typeof("CK_ATTRIBUTE[]")
ATTR_SIZE = ffi.sizeof("CK_ATTRIBUTE")
# C_GetAttributeValue return values after which the attributes' lengths and values mean
# something.
GET_RVS = frozenset({CKR["CKR_OK"], CKR["CKR_ATTRIBUTE_SENSITIVE"],
                     CKR["CKR_ATTRIBUTE_TYPE_INVALID"], CKR["CKR_BUFFER_TOO_SMALL"]})
# All value buffers of one C_GetAttributeValue together.
GET_BUDGET = 4 * MAX_OUTPUT

# Plan entries of a template_get attribute: (what, type, buffer or inner array, cap or
# inner plan).
_QUERY, _BUFFER, _NESTED = 0, 1, 2


# -- input templates --------------------------------------------------------------------

def _attributes(items: Any, keep: list[Any], depth: int) -> Any:
    if type(items) is not list:
        raise BadArguments("a template is an array of [type, value]")
    arr = ffi.new(ATTRS, len(items) or 1)
    keep.append(arr)
    for i, item in enumerate(items):
        if type(item) is not list or len(item) != 2:
            raise BadArguments("an attribute is [type, value]")
        atype, value = item
        a = arr[i]
        a.type = ulong(atype, "an attribute type")
        if type(value) is bytes and atype not in NESTED:
            buf = ffi.from_buffer(BYTES, value)
            keep.append(buf)
            a.pValue = buf
            a.ulValueLen = len(value)
        elif value is None:
            pass  # NULL, 0
        elif type(value) is int:
            a.ulValueLen = ulong(value, "an attribute length")  # NULL with a length
        elif type(value) is list and atype in NESTED:
            if depth + 1 >= MAX_DEPTH:
                raise BadArguments("templates nest too deep")
            a.pValue = _attributes(value, keep, depth + 1)
            a.ulValueLen = len(value) * ATTR_SIZE
        else:
            raise BadArguments("an attribute value is bin, nil, a length, or (for a "
                               "template attribute) an array")
    return arr


def put_template(v: Any, cargs: list[Any]) -> Any:
    """array: (attributes, count); nil: (NULL, 0); int: (NULL, that count)."""
    if type(v) is list:
        keep: list[Any] = []
        cargs += (_attributes(v, keep, 0), len(v))
        return keep
    if v is None:
        cargs += (NULL, 0)
    else:
        cargs += (NULL, ulong(v, "a template, nil or a count"))
    return None


# -- C_GetAttributeValue ----------------------------------------------------------------

def _request(items: Any, keep: list[Any], budget: list[int], depth: int) -> tuple[Any, list[Any]]:
    """The CK_ATTRIBUTE array for a request of [type, cap]s, and its plan."""
    if type(items) is not list:
        raise BadArguments("a template is an array of [type, cap]")
    arr = ffi.new(ATTRS, len(items) or 1)
    keep.append(arr)
    plan: list[Any] = []
    for i, item in enumerate(items):
        if type(item) is not list or len(item) != 2:
            raise BadArguments("an attribute request is [type, cap]")
        atype, cap = item
        a = arr[i]
        a.type = ulong(atype, "an attribute type")
        if cap is None:  # a length query: NULL pValue
            plan.append((_QUERY, atype, None, 0))
        elif atype in NESTED:
            if type(cap) is not list:
                raise BadArguments("a template attribute's room is an array of [type, cap]")
            if depth + 1 >= MAX_DEPTH:
                raise BadArguments("templates nest too deep")
            inner, inner_plan = _request(cap, keep, budget, depth + 1)
            a.pValue = inner
            a.ulValueLen = len(cap) * ATTR_SIZE
            plan.append((_NESTED, atype, inner, inner_plan))
        else:
            n = capacity(cap)
            budget[0] -= n
            if budget[0] < 0:
                raise TooLarge("the attribute values asked for do not fit a reply frame")
            buf = ffi.new(BYTES, n or 1)
            keep.append(buf)
            a.pValue = buf
            a.ulValueLen = n
            plan.append((_BUFFER, atype, buf, n))
    return arr, plan


def _values(arr: Any, plan: list[Any]) -> list[Any]:
    """One reply value per planned attribute: bin if written and it fits, else its
    length (2**64-1 for unavailable; a count for a template attribute); a template
    attribute's inner attributes as [type, value] each."""
    out: list[Any] = []
    for i, (what, atype, buf, cap) in enumerate(plan):
        length = arr[i].ulValueLen
        if length == UNAVAILABLE_C:
            out.append(UNAVAILABLE)
        elif what == _BUFFER:
            out.append(ffi.buffer(buf, length)[:] if length <= cap else length)
        elif what == _QUERY:
            out.append(length // ATTR_SIZE if atype in NESTED else length)
        else:
            count = length // ATTR_SIZE
            if count > len(cap):
                out.append(count)
            else:
                inner_plan = cap[:count]
                values = _values(buf, inner_plan)
                # the module writes the inner types too: they travel with the values
                out.append([[buf[j].type, values[j]] for j in range(count)])
    return out


def put_template_get(v: Any, cargs: list[Any]) -> Any:
    if type(v) is list:
        keep: list[Any] = []
        arr, plan = _request(v, keep, [GET_BUDGET], 0)
        cargs += (arr, len(v))
        return (arr, plan, keep)
    if v is None:
        cargs += (NULL, 0)
    else:
        cargs += (NULL, ulong(v, "a template, nil or a count"))
    return None


def get_template_get(state: Any, rv: int) -> Any:
    if state is None or rv not in GET_RVS:
        return None
    return _values(state[0], state[1])


CONVERTERS: dict[str, Converter] = {
    "template": Converter(put_template, None),
    "template_get": Converter(put_template_get, get_template_get),
}
