"""The typed view of one request on the call path (decode and admit): for each function
of protocol/functions.spec, where its handles (with their roles), mechanism, templates and
buffers sit in the request and its reply; the arguments no module is ever handed
(unsafe_arguments, the same checks as the helper's); and the small facts the stages share
(which calls show a random key's bits, the exceptions that move a call to another
member).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from p11p.daemon.errors import CKError
from p11p.daemon.virtual import CKA_TOKEN
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKR

Reply = list[Any]

OK = CKR["CKR_OK"]
DEVICE_ERROR = CKR["CKR_DEVICE_ERROR"]
OBJECT_HANDLE_INVALID = CKR["CKR_OBJECT_HANDLE_INVALID"]
WRITE_PROTECTED = CKR["CKR_TOKEN_WRITE_PROTECTED"]
MECHANISM_PARAM_INVALID = CKR["CKR_MECHANISM_PARAM_INVALID"]
ATTRIBUTE_VALUE_INVALID = CKR["CKR_ATTRIBUTE_VALUE_INVALID"]
ALREADY_LOGGED_IN = CKR["CKR_USER_ALREADY_LOGGED_IN"]
SESSION_HANDLE_INVALID = CKR["CKR_SESSION_HANDLE_INVALID"]
SESSION_CLOSED = CKR["CKR_SESSION_CLOSED"]
USER_NOT_LOGGED_IN = CKR["CKR_USER_NOT_LOGGED_IN"]
GENERAL_ERROR = CKR["CKR_GENERAL_ERROR"]
CODE = {f.name: f.code for f in spec.functions()}
# From functions.spec's @writes flags.
GENERATING = frozenset(f.name for f in spec.functions() if f.writes == "generate")
CREATING = frozenset(f.name for f in spec.functions() if f.writes in spec.CREATES)
MODIFYING = frozenset(f.name for f in spec.functions() if f.writes in ("destroy", "set"))
MECH_OBJECT_FIELDS = {
    m.value: [i for i, f in enumerate(m.param.fields) if f.kind == "object"]
    for m in spec.mechanisms().values() if any(f.kind == "object" for f in m.param.fields)
}


@dataclass(frozen=True)
class CallShape:
    """Where a function's handles and buffers sit in its request and reply."""

    fn: spec.Function
    objects: tuple[int, ...]  # request positions of object handles
    object_rvs: tuple[int, ...]  # per object handle, the CK_RV of an unknown one (its role)
    mechanism: int | None  # request position of the mechanism
    templates: tuple[int, ...]  # request positions of input templates
    templates_get: tuple[int, ...]  # request positions of templates to read
    data: int | None  # request position of the first bytes input
    out_bytes: int | None  # request position of an out_bytes capacity
    created: tuple[int, ...]  # reply positions of new object handles
    found: int | None  # reply position of a found-objects list


def _shape(fn: spec.Function) -> CallShape:
    req = list(enumerate(fn.wire_args, 1))
    outs = list(enumerate(fn.outputs, 1))

    def first(kind: str) -> int | None:
        return next((i for i, a in req if a.kind == kind), None)

    return CallShape(
        fn, tuple(i for i, a in req if a.kind == "object"),
        tuple(CKR[spec.HANDLE_ROLES[a.role]] for _, a in req if a.kind == "object"),
        first("mechanism"),
        tuple(i for i, a in req if a.kind == "template"),
        tuple(i for i, a in req if a.kind == "template_get"), first("bytes"), first("out_bytes"),
        tuple(j for j, a in outs if a.kind == "out_object"),
        next((j for j, a in outs if a.kind == "out_objects"), None))


SHAPES = {f.code: _shape(f) for f in spec.functions()}


def unsafe_arguments(shape: CallShape, vreq: list[Any]) -> CKError | None:
    """Arguments that a module would read memory through, never passed on: a module
    that crashes on them takes its helper down, and a helper that dies is a failed
    member for every application. A mechanism of mechanisms.spec with a bin parameter
    (the module would take its bytes for the structure and follow pointers in it), and
    an input attribute with a NULL value and a non-zero length, at any depth (SoftHSM2
    reads through it in C_CreateObject, C_GenerateKey, C_FindObjectsInit, ...)."""
    if shape.mechanism is not None:
        mech = vreq[shape.mechanism]
        if (isinstance(mech, list) and len(mech) == 2 and isinstance(mech[1], bytes)
                and isinstance(mech[0], int) and mech[0] in _STRUCTURED):
            return CKError(MECHANISM_PARAM_INVALID, "a structured parameter sent as bytes")
    stack = [vreq[i] for i in shape.templates]
    while stack:
        template = stack.pop()
        if not isinstance(template, list):
            continue
        for attr in template:
            if isinstance(attr, list) and len(attr) == 2:
                value = attr[1]
                if isinstance(value, int) and value != 0:
                    return CKError(ATTRIBUTE_VALUE_INVALID, "an attribute value NULL with a length")
                if isinstance(value, list):
                    stack.append(value)
    return None


_STRUCTURED = frozenset(spec.mechanisms())


class KeyMissing(Exception):
    """A token object is not on this member (its key set differs)."""


class SessionVanished(CKError):
    """A member session just opened was gone when it was logged in (its helper was
    replaced meanwhile: the member failed and recovered under a concurrent call). The
    call is placed again; where it is not, it is CKR_DEVICE_ERROR as before."""

    def __init__(self) -> None:
        super().__init__(DEVICE_ERROR, "the member session vanished before its login")


def member_session(real: dict[Any, int], member: Any) -> int:
    """The member session in `real` (a session's, or an object's handle there), which a
    concurrent failure of the member (its helper gone) may have taken away meanwhile:
    then the call is placed again."""
    handle = real.get(member)
    if handle is None:
        raise SessionVanished
    return handle


# Calls on an object that show nothing of a random key's bits (a C_CopyObject copy
# depends on its source through its recipe instead), and the attributes that do.
_NOT_A_USE = frozenset(f.name for f in spec.functions()
                       if f.writes in ("copy", "destroy", "set") or f.reads)
_REVEALING = frozenset(CKA[n] for n in (
    "CKA_VALUE", "CKA_CHECK_VALUE", "CKA_MODULUS", "CKA_PUBLIC_EXPONENT", "CKA_EC_POINT",
    "CKA_PUBLIC_KEY_INFO", "CKA_PRIVATE_EXPONENT", "CKA_PRIME_1", "CKA_PRIME_2"))


def reveals(shape: CallShape, vreq: list[Any]) -> bool:
    """Whether a successful call shows the bits of the objects it names."""
    if shape.fn.reads:  # reading the value attributes shows the bits
        return any(isinstance(a, list) and a and a[0] in _REVEALING
                   for i in shape.templates_get for a in (vreq[i] or []) if isinstance(vreq[i], list))
    return shape.fn.name not in _NOT_A_USE


def digest(data: Any) -> bytes | None:
    return hashlib.blake2b(data, digest_size=16).digest() if isinstance(data, bytes) else None


def template_sets_token(template: Any) -> bool | None:
    if isinstance(template, list):
        for attr in template:
            if isinstance(attr, list) and len(attr) == 2 and attr[0] == CKA_TOKEN:
                return bool(attr[1] == b"\x01")
    return None


