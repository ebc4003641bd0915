"""Hypothesis strategies for hostile client frames, made from protocol/functions.spec
and mechanisms.spec: a well-formed request of every function (so every function is
covered by construction), then mutated (values of the wrong msgpack type, wrong
lengths, out-of-range integers, bogus handles, deep nesting in templates and
mechanism parameters, missing and extra arguments, other codes), and the frame itself
broken (truncated, oversize or lying length prefixes, trailing bytes, garbage).

The requests carry handles that the test learns only at run time (the example's own
session and objects), so strategies take a `Known` of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
from hypothesis import strategies as st
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKF, CKK, CKM, CKO

U64 = 2**64 - 1
HEADER = struct.Struct(">I")
FIND_ALL = 1001  # p11p's own code (protocol/README.md)
# the data plane's codes
DIRECT_BIND, DIRECT_KEY, DIRECT_UNBIND, DIRECT_ADOPT, DIRECT_ADOPT_UPDATE = 1002, 1003, 1004, 1006, 1007
NESTED = (CKA["CKA_WRAP_TEMPLATE"], CKA["CKA_UNWRAP_TEMPLATE"], CKA["CKA_DERIVE_TEMPLATE"])
# Sizes of keys and parameters to generate: kept small, so that no example asks the
# token for minutes of work (a 16384-bit RSA key, a 4096-bit DH prime).
BIT_ATTRS = frozenset(CKA[n] for n in ("CKA_MODULUS_BITS", "CKA_PRIME_BITS",
                                       "CKA_SUB_PRIME_BITS", "CKA_VALUE_BITS"))
SLOW_MECHS = frozenset(CKM[n] for n in ("CKM_DH_PKCS_PARAMETER_GEN", "CKM_DSA_PARAMETER_GEN",
                                        "CKM_RSA_PKCS_KEY_PAIR_GEN", "CKM_RSA_X9_31_KEY_PAIR_GEN",
                                        "CKM_DSA_KEY_PAIR_GEN", "CKM_DH_PKCS_KEY_PAIR_GEN")
                       if n in CKM)
EDGE_ULONGS = (0, 1, 2, 0x7F, 0xFF, 0x100, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**63 - 1, 2**63, U64 - 1, U64)
# Functions that block by design when asked to (C_WaitForSlotEvent without
# CKF_DONT_BLOCK): the test does not wait for their reply.
WAIT_FOR_SLOT_EVENT = spec.by_name()["C_WaitForSlotEvent"].code
CKF_DONT_BLOCK = CKF["CKF_DONT_BLOCK"]
# Requests that end the example's session, objects or context (the test makes them
# again for the next example).
DESTRUCTIVE = frozenset(spec.by_name()[n].code for n in (
    "C_Finalize", "C_CloseSession", "C_CloseAllSessions", "C_DestroyObject", "C_Logout"))
SENDABLE = tuple(f for f in spec.functions() if not f.local)


@dataclass
class Known:
    """Handles that mean something in the example's application context: its
    sessions, its objects (`keys` names some of them: aes, ec_pub, ec_priv, data,
    rsa_pub, rsa_priv) and the slots."""

    sessions: list[int] = field(default_factory=list)
    objects: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=lambda: [0])
    keys: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Deep:
    """`inner` wrapped in `depth` one-element arrays; packed by hand (pack below), as
    deep as msgpack allows on the receiving side and deeper."""

    depth: int
    inner: Any


# -- packing, including what msgpack's own packer refuses to make ------------------------

def pack(obj: Any) -> bytes:
    if isinstance(obj, Deep):
        return b"\x91" * obj.depth + pack(obj.inner)
    if isinstance(obj, list):
        n = len(obj)
        head = (bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 65536
                else b"\xdd" + struct.pack(">I", n))
        return head + b"".join(pack(x) for x in obj)
    if isinstance(obj, dict):
        n = len(obj)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(pack(k) + pack(v) for k, v in obj.items())
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def frame_bytes(obj: Any) -> bytes:
    body = pack(obj)
    return HEADER.pack(len(body)) + body


# How deep msgpack-python (the daemon's decoder) nests arrays and maps; deeper is a
# frame that does not decode, a protocol error.
MAX_DECODE_DEPTH = 1024


def depth(obj: Any) -> int:
    """Nesting depth of arrays and maps (an array of scalars is 1)."""
    if isinstance(obj, Deep):
        return obj.depth + depth(obj.inner)
    if isinstance(obj, list):
        return 1 + max((depth(x) for x in obj), default=0)
    if isinstance(obj, dict):
        return 1 + max((max(depth(k), depth(v)) for k, v in obj.items()), default=0)
    return 0


def request_frame(req: Any, max_frame: int, chunks: int = 1) -> Frame:
    """A request as a frame, with what the daemon must do with it."""
    data = frame_bytes(req)
    if len(data) - HEADER.size > max_frame or depth(req) > MAX_DECODE_DEPTH:
        return Frame(data, "close", req, chunks)
    return Frame(data, "any" if blocks(req) else "reply", req, chunks)


# -- values ---------------------------------------------------------------------------

def ulongs() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 16), st.sampled_from(EDGE_ULONGS), st.integers(0, U64))


def bad_ints() -> st.SearchStrategy[Any]:
    """Integers outside CK_ULONG, and what Python takes for an int."""
    return st.one_of(st.integers(-(2**63), -1), st.sampled_from([-1, -(2**63), True, False]),
                     st.just(U64))


def junk() -> st.SearchStrategy[Any]:
    """Any msgpack value at all."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), U64),
                     st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=24),
                     st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=4), st.binary(max_size=4)), inner,
                        max_size=3)), max_leaves=12)


def handles(pool: list[int]) -> st.SearchStrategy[int]:
    """Mostly a live handle of the example, else a bogus one."""
    bogus = st.one_of(st.integers(0, 64), st.sampled_from(EDGE_ULONGS))
    if not pool:
        return bogus
    return st.one_of(st.sampled_from(pool), st.sampled_from(pool), st.sampled_from(pool), bogus)


def data_bytes() -> st.SearchStrategy[Any]:
    """`bytes`/`pin`: bin, nil (NULL, 0) or a length (NULL, len)."""
    return st.one_of(st.binary(max_size=80), st.sampled_from([b"\0" * 16, b"\0" * 32, b"x" * 64]),
                     st.binary(min_size=100, max_size=600), st.none(), st.integers(0, 300),
                     st.sampled_from(EDGE_ULONGS))


def capacities() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.integers(0, 600), st.just(4096), st.sampled_from(EDGE_ULONGS))


def ulong_value(v: int) -> bytes:
    return struct.pack("<Q", v)


def _cka(*names: str) -> tuple[int, ...]:
    return tuple(CKA[n] for n in names if n in CKA)


# Attributes by what their value is, so that templates look like real ones before a
# mutation spoils them.
BOOL_ATTRS = _cka("CKA_TOKEN", "CKA_PRIVATE", "CKA_MODIFIABLE", "CKA_COPYABLE",
                  "CKA_DESTROYABLE", "CKA_SENSITIVE", "CKA_EXTRACTABLE", "CKA_ENCRYPT",
                  "CKA_DECRYPT", "CKA_SIGN", "CKA_VERIFY", "CKA_WRAP", "CKA_UNWRAP",
                  "CKA_DERIVE", "CKA_SIGN_RECOVER", "CKA_VERIFY_RECOVER", "CKA_TRUSTED",
                  "CKA_WRAP_WITH_TRUSTED", "CKA_ALWAYS_AUTHENTICATE", "CKA_LOCAL")
BYTES_ATTRS = _cka("CKA_LABEL", "CKA_ID", "CKA_VALUE", "CKA_APPLICATION", "CKA_OBJECT_ID",
                   "CKA_SUBJECT", "CKA_ISSUER", "CKA_SERIAL_NUMBER", "CKA_EC_PARAMS",
                   "CKA_EC_POINT", "CKA_MODULUS", "CKA_PUBLIC_EXPONENT", "CKA_PRIME",
                   "CKA_BASE", "CKA_SUBPRIME", "CKA_START_DATE", "CKA_END_DATE",
                   "CKA_ALLOWED_MECHANISMS", "CKA_CHECK_VALUE", "CKA_URL")
ULONG_ATTRS = _cka("CKA_VALUE_LEN", "CKA_CERTIFICATE_TYPE", "CKA_KEY_GEN_MECHANISM",
                   "CKA_CERTIFICATE_CATEGORY", "CKA_MECHANISM_TYPE", "CKA_HW_FEATURE_TYPE")
EC_PARAMS = (bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06052b81040022"),
             bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")


def attr_types() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(_cka("CKA_CLASS", "CKA_KEY_TYPE")),
                     st.sampled_from(BOOL_ATTRS), st.sampled_from(BYTES_ATTRS),
                     st.sampled_from(ULONG_ATTRS + tuple(sorted(BIT_ATTRS))),
                     st.sampled_from(NESTED), st.sampled_from(sorted(CKA.values())), ulongs())


def broken_value() -> st.SearchStrategy[Any]:
    """What no attribute of its type holds: nil, NULL with a length, odd sizes."""
    return st.one_of(st.binary(max_size=40), st.none(), st.integers(0, 64),
                     st.sampled_from(EDGE_ULONGS))


def attr_value(atype: int, depth: int) -> st.SearchStrategy[Any]:
    if atype in BIT_ATTRS:  # small sizes only (see BIT_ATTRS)
        return st.one_of(st.sampled_from([256, 512, 1024]).map(ulong_value),
                         st.integers(0, 1024).map(ulong_value), st.binary(max_size=4),
                         st.none(), st.integers(0, 16))
    if atype == CKA["CKA_CLASS"]:
        right: st.SearchStrategy[Any] = st.sampled_from(sorted(CKO.values())).map(ulong_value)
    elif atype == CKA["CKA_KEY_TYPE"]:
        right = st.sampled_from(sorted(CKK.values())).map(ulong_value)
    elif atype in BOOL_ATTRS:
        right = st.sampled_from([b"\x00", b"\x01"])
    elif atype == CKA["CKA_EC_PARAMS"]:
        right = st.sampled_from(EC_PARAMS)
    elif atype in ULONG_ATTRS:
        right = st.sampled_from([0, 1, 16, 24, 32, 64, 2**32, U64]).map(ulong_value)
    elif atype in NESTED and depth > 0:
        right = templates(depth - 1)
    else:
        right = st.binary(max_size=40)
    options = [right, right, right, broken_value()]
    if depth > 0:
        options.append(templates(depth - 1))
    return st.one_of(*options)


@st.composite
def attribute(draw: st.DrawFn, depth: int) -> list[Any]:
    atype = draw(attr_types())
    return [atype, draw(attr_value(atype, depth))]


def random_templates(depth: int) -> st.SearchStrategy[list[Any]]:
    return st.lists(attribute(depth), max_size=7)


def _t(*pairs: tuple[str, Any]) -> list[list[Any]]:
    return [[CKA[name], ulong_value(v) if type(v) is int else v] for name, v in pairs]


_TRUE, _FALSE = b"\x01", b"\x00"
# Templates as applications write them; a mutation then breaks one thing in them.
REAL_TEMPLATES: tuple[list[list[Any]], ...] = (
    _t(("CKA_CLASS", CKO["CKO_SECRET_KEY"]), ("CKA_KEY_TYPE", CKK["CKK_AES"]),
       ("CKA_VALUE_LEN", 16), ("CKA_TOKEN", _FALSE), ("CKA_ENCRYPT", _TRUE),
       ("CKA_DECRYPT", _TRUE)),
    _t(("CKA_CLASS", CKO["CKO_SECRET_KEY"]), ("CKA_KEY_TYPE", CKK["CKK_AES"]),
       ("CKA_VALUE", b"k" * 16), ("CKA_TOKEN", _FALSE)),
    _t(("CKA_CLASS", CKO["CKO_SECRET_KEY"]), ("CKA_KEY_TYPE", CKK["CKK_GENERIC_SECRET"]),
       ("CKA_VALUE_LEN", 32), ("CKA_SIGN", _TRUE), ("CKA_DERIVE", _TRUE)),
    _t(("CKA_CLASS", CKO["CKO_DATA"]), ("CKA_LABEL", b"hostile"), ("CKA_VALUE", b"v" * 20),
       ("CKA_TOKEN", _FALSE)),
    _t(("CKA_EC_PARAMS", EC_PARAMS[0]), ("CKA_VERIFY", _TRUE), ("CKA_TOKEN", _FALSE)),
    _t(("CKA_SIGN", _TRUE), ("CKA_DERIVE", _TRUE), ("CKA_TOKEN", _FALSE),
       ("CKA_PRIVATE", _TRUE)),
    _t(("CKA_CLASS", CKO["CKO_SECRET_KEY"])),
    _t(("CKA_LABEL", b"hostile"), ("CKA_TOKEN", _FALSE)),
    _t(("CKA_LABEL", b"hostile-rsa"), ("CKA_CLASS", CKO["CKO_PRIVATE_KEY"])),
    _t(("CKA_CLASS", CKO["CKO_SECRET_KEY"]), ("CKA_KEY_TYPE", CKK["CKK_AES"]),
       ("CKA_VALUE_LEN", 16), ("CKA_WRAP", _TRUE), ("CKA_UNWRAP", _TRUE))
    + [[CKA["CKA_WRAP_TEMPLATE"], _t(("CKA_CLASS", CKO["CKO_SECRET_KEY"]),
                                     ("CKA_KEY_TYPE", CKK["CKK_AES"]))]],
    [],
)


@st.composite
def real_template(draw: st.DrawFn, depth: int) -> list[Any]:
    """A real template, with (mostly) one attribute broken, one added or one dropped."""
    t = [list(a) for a in draw(st.sampled_from(REAL_TEMPLATES))]
    how = draw(st.sampled_from(["value", "value", "value", "type", "add", "drop", "junk",
                                "none"]))
    i = draw(st.integers(0, len(t) - 1)) if t else None
    if how == "value" and i is not None:
        t[i][1] = draw(st.one_of(broken_value(), random_templates(max(0, depth - 1))))
    elif how == "type" and i is not None:
        t[i][0] = draw(attr_types())
    elif how == "add" or (i is None and how != "none"):
        t.insert(draw(st.integers(0, len(t))), draw(attribute(depth)))
    elif how == "drop" and i is not None:
        del t[i]
    elif how == "junk" and i is not None:
        t[i] = draw(junk())
    return t


def templates(depth: int = 3) -> st.SearchStrategy[list[Any]]:
    return st.one_of(real_template(depth), real_template(depth), random_templates(depth))


@st.composite
def get_attribute(draw: st.DrawFn, depth: int) -> list[Any]:
    """An element of a template_get request: [type, cap], nested [type, [[type, cap]]]."""
    atype = draw(attr_types())
    options: list[st.SearchStrategy[Any]] = [st.none(), st.integers(0, 300),
                                             st.sampled_from(EDGE_ULONGS)]
    if depth > 0:
        options.append(st.lists(get_attribute(depth - 1), max_size=4))
    return [atype, draw(st.one_of(*options))]


def field_value(kind: str, known: Known) -> st.SearchStrategy[Any]:
    if kind == "ulong":
        return ulongs()
    if kind == "bbool":
        return st.sampled_from([0, 1])
    if kind == "bytes":
        return st.one_of(st.none(), st.binary(max_size=80))
    if kind == "fixed16":
        return st.binary(min_size=16, max_size=16)
    if kind == "fixed8":
        return st.binary(min_size=8, max_size=8)
    return handles(known.objects)  # object


def _ckm(*names: str) -> list[int]:
    return [CKM[n] for n in names if n in CKM]


# What SoftHSM2 does (so that examples get past "mechanism invalid"); then any type.
COMMON_MECHS = _ckm(
    "CKM_AES_ECB", "CKM_AES_CBC", "CKM_AES_CBC_PAD", "CKM_AES_CTR", "CKM_AES_GCM",
    "CKM_AES_CMAC", "CKM_AES_KEY_WRAP", "CKM_AES_KEY_WRAP_PAD", "CKM_AES_KEY_GEN",
    "CKM_AES_ECB_ENCRYPT_DATA", "CKM_AES_CBC_ENCRYPT_DATA", "CKM_DES3_CBC", "CKM_DES3_ECB",
    "CKM_DES3_KEY_GEN", "CKM_EC_KEY_PAIR_GEN", "CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_ECDSA",
    "CKM_EDDSA", "CKM_ECDH1_DERIVE", "CKM_SHA_1", "CKM_SHA256", "CKM_SHA512", "CKM_MD5",
    "CKM_SHA256_HMAC", "CKM_SHA_1_HMAC", "CKM_GENERIC_SECRET_KEY_GEN", "CKM_RSA_PKCS",
    "CKM_RSA_X_509", "CKM_RSA_PKCS_OAEP", "CKM_RSA_PKCS_PSS", "CKM_SHA256_RSA_PKCS",
    "CKM_CONCATENATE_BASE_AND_KEY", "CKM_CONCATENATE_BASE_AND_DATA", "CKM_XOR_BASE_AND_DATA",
    "CKM_DSA", "CKM_DH_PKCS_DERIVE")
MECH_TYPES = sorted(v for v in set(CKM.values()) if v not in SLOW_MECHS)


@st.composite
def mechanism(draw: st.DrawFn, known: Known) -> Any:
    structured = spec.mechanisms()
    choice = draw(st.integers(0, 6))
    if choice == 6 and structured:  # a structure's bytes, pointers and all
        return [draw(st.sampled_from(sorted(structured))), draw(st.binary(min_size=8, max_size=64))]
    if choice <= 1 and structured:
        mtype = draw(st.sampled_from(sorted(structured)))
        fields = structured[mtype].param.fields
        param: Any = [draw(field_value(f.kind, known)) for f in fields]
        return [mtype, param]
    if choice <= 4:
        mtype = draw(st.sampled_from(COMMON_MECHS))
    else:
        mtype = draw(st.one_of(st.sampled_from(MECH_TYPES), ulongs()))
    param = draw(st.one_of(st.none(), st.sampled_from([b"\0" * 16, b"\0" * 8, b"\0" * 12]),
                           st.binary(max_size=48)))
    return [mtype, param]


def valid_value(kind: str, known: Known) -> st.SearchStrategy[Any]:
    """A value of the right shape for an argument kind (its meaning may still be bad)."""
    if kind == "ulong":
        return ulongs()
    if kind == "bbool":
        return st.sampled_from([0, 1])
    if kind == "slot":
        return st.one_of(st.sampled_from(known.slots), st.sampled_from(known.slots), ulongs())
    if kind == "session":
        return handles(known.sessions)
    if kind == "object":
        return handles(known.objects)
    if kind in ("bytes", "pin"):
        return data_bytes()
    if kind == "label32":
        return st.one_of(st.none(), st.binary(min_size=32, max_size=32))
    if kind == "template":
        return st.one_of(templates(), templates(), st.none(), st.integers(0, 64))
    if kind == "mechanism":
        return st.one_of(mechanism(known), mechanism(known), st.none())
    if kind in ("out_bytes", "out_slots", "out_mechs", "out_objects"):
        return capacities()
    if kind == "out_random":
        return st.one_of(st.none(), st.integers(0, 512), st.sampled_from(EDGE_ULONGS))
    if kind in ("out_ulong", "out_slot", "out_session", "out_object", "out_info",
                "out_slot_info", "out_token_info", "out_mech_info", "out_session_info"):
        return st.one_of(st.none(), st.just(0), junk())
    if kind == "template_get":
        return st.one_of(st.lists(get_attribute(2), max_size=6), st.none(), st.integers(0, 64))
    raise AssertionError(f"kind {kind}")


def well_formed(fn: spec.Function, known: Known) -> st.SearchStrategy[list[Any]]:
    """A request of `fn` whose every argument has the shape of its kind."""
    args = [valid_value(a.kind, known) for a in fn.wire_args]
    return st.tuples(*args).map(lambda values: [fn.code, *values])


# -- mutations ------------------------------------------------------------------------

@st.composite
def mutated(draw: st.DrawFn, request: list[Any], known: Known) -> list[Any]:
    """`request` with one to three things broken."""
    req = list(request)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["junk", "bad_int", "drop", "extra", "handle", "deep",
                                    "deep_template", "deep_mech", "code", "swap"]))
        i = draw(st.integers(1, max(1, len(req) - 1))) if len(req) > 1 else None
        if how == "junk" and i is not None:
            req[i] = draw(junk())
        elif how == "bad_int" and i is not None:
            req[i] = draw(bad_ints())
        elif how == "drop" and i is not None:
            del req[i]
        elif how == "extra":
            req.append(draw(junk()))
        elif how == "handle" and i is not None:
            req[i] = draw(st.one_of(handles(known.sessions + known.objects), bad_ints()))
        elif how == "deep" and i is not None:
            req[i] = Deep(draw(st.sampled_from([2, 32, 200, 1000, 1030, 5000])), req[i])
        elif how == "deep_template" and i is not None:
            inner: Any = draw(st.one_of(st.just([]), templates(0)))
            for _ in range(draw(st.integers(2, 40))):
                inner = [[draw(st.sampled_from(NESTED)), inner]]
            req[i] = inner
        elif how == "deep_mech" and i is not None:
            mtype = draw(st.sampled_from(sorted(spec.mechanisms()) or [0]))
            req[i] = [mtype, Deep(draw(st.integers(1, 1100)), draw(junk()))]
        elif how == "code":
            req[0] = draw(st.one_of(st.sampled_from([0, 1, 3, 4, 66, 67, 69, FIND_ALL, 1000,
                                                     1002, -1, U64]),
                                    bad_ints(), st.integers(0, 2000), junk()))
        elif how == "swap" and len(req) > 2:
            j = draw(st.integers(1, len(req) - 1))
            req[i or 1], req[j] = req[j], req[i or 1]
    return req


def find_all(known: Known) -> st.SearchStrategy[list[Any]]:
    """FIND_ALL, p11p's own code: [1001, session, template]."""
    return st.tuples(st.just(FIND_ALL), handles(known.sessions),
                     st.one_of(templates(), templates(), st.none(), st.integers(0, 9))).map(list)


def direct(known: Known) -> st.SearchStrategy[list[Any]]:
    """The data plane's codes: [1002, session], [1003, session, object],
    [1004, session, why], [1006, session, init, mechanism, key, replayable],
    [1007, session, code, data, out_cap, digest], with handles and arguments good or bad."""
    session = st.one_of(handles(known.sessions), bad_ints(), junk())
    code = st.one_of(st.sampled_from(SENDABLE).map(lambda f: f.code), bad_ints(), junk())
    return st.one_of(
        st.tuples(st.just(DIRECT_BIND), session),
        st.tuples(st.just(DIRECT_KEY), session,
                  st.one_of(handles(known.objects), bad_ints(), junk())),
        st.tuples(st.just(DIRECT_UNBIND), session,
                  st.one_of(st.integers(-2, 5), bad_ints(), junk())),
        st.tuples(st.just(DIRECT_ADOPT), session, code,
                  st.one_of(st.none(), junk(), mechanism(known)),
                  st.one_of(handles(known.objects), bad_ints(), junk()),
                  st.one_of(st.integers(0, 1), junk())),
        st.tuples(st.just(DIRECT_ADOPT_UPDATE), session, code,
                  st.one_of(st.binary(max_size=64), junk()),
                  st.one_of(st.integers(0, 300), bad_ints(), junk()),
                  st.one_of(st.binary(max_size=20), junk())),
        # not empty: an empty request is a protocol error (the connection is closed)
        st.lists(st.one_of(st.sampled_from([DIRECT_BIND, DIRECT_KEY, DIRECT_UNBIND, DIRECT_ADOPT,
                                            DIRECT_ADOPT_UPDATE]), junk()),
                 min_size=1, max_size=5),
    ).map(list)


def requests(known: Known) -> st.SearchStrategy[list[Any]]:
    """A request of any function that travels (FIND_ALL included), well formed or
    mutated."""
    fns = st.sampled_from(SENDABLE)

    @st.composite
    def one(draw: st.DrawFn) -> list[Any]:
        pick = draw(st.integers(0, 19))
        if pick < 2:
            req: list[Any] = draw(find_all(known))
        elif pick == 2:
            req = draw(direct(known))
        else:
            req = draw(well_formed(draw(fns), known))
        if draw(st.booleans()):
            req = draw(mutated(req, known))
        return req
    return one()


# -- preludes: a proper start of the operation a function continues -------------------

def _code(name: str) -> int:
    return spec.by_name()[name].code


def _inits(known: Known, session: int) -> dict[str, list[Any]]:
    k = known.keys
    iv = b"\0" * 16
    return {
        "encrypt": [_code("C_EncryptInit"), session, [CKM["CKM_AES_CBC_PAD"], iv], k.get("aes", 0)],
        "decrypt": [_code("C_DecryptInit"), session, [CKM["CKM_AES_CBC_PAD"], iv], k.get("aes", 0)],
        "digest": [_code("C_DigestInit"), session, [CKM["CKM_SHA256"], None]],
        "sign": [_code("C_SignInit"), session, [CKM["CKM_AES_CMAC"], None], k.get("aes", 0)],
        "sign_ec": [_code("C_SignInit"), session, [CKM["CKM_ECDSA"], None], k.get("ec_priv", 0)],
        "sign_pss": [_code("C_SignInit"), session, [CKM["CKM_RSA_PKCS_PSS"],
                                                    [CKM["CKM_SHA256"], 2, 32]], k.get("rsa_priv", 0)],
        "verify": [_code("C_VerifyInit"), session, [CKM["CKM_AES_CMAC"], None], k.get("aes", 0)],
        "verify_ec": [_code("C_VerifyInit"), session, [CKM["CKM_ECDSA"], None], k.get("ec_pub", 0)],
        "oaep": [_code("C_EncryptInit"), session, [CKM["CKM_RSA_PKCS_OAEP"],
                                                  [CKM["CKM_SHA_1"], 1, 1, None]], k.get("rsa_pub", 0)],
        "gcm": [_code("C_EncryptInit"), session, [CKM["CKM_AES_GCM"], [b"\0" * 12, 96, b"aad", 128]],
                k.get("aes", 0)],
        "find": [_code("C_FindObjectsInit"), session, []],
    }


PRELUDES: dict[str, tuple[tuple[str, ...], ...]] = {
    "C_Encrypt": (("encrypt",), ("oaep",), ("gcm",)),
    "C_EncryptUpdate": (("encrypt",), ("gcm",)), "C_EncryptFinal": (("encrypt",), ("gcm",)),
    "C_Decrypt": (("decrypt",),), "C_DecryptUpdate": (("decrypt",),),
    "C_DecryptFinal": (("decrypt",),),
    "C_Digest": (("digest",),), "C_DigestUpdate": (("digest",),), "C_DigestKey": (("digest",),),
    "C_DigestFinal": (("digest",),), "C_GetOperationState": (("digest",),),
    "C_SetOperationState": (("digest",),),
    "C_Sign": (("sign",), ("sign_ec",), ("sign_pss",)), "C_SignUpdate": (("sign",),),
    "C_SignFinal": (("sign",),), "C_Verify": (("verify",), ("verify_ec",)),
    "C_VerifyUpdate": (("verify",),), "C_VerifyFinal": (("verify",),),
    "C_DigestEncryptUpdate": (("digest", "encrypt"),),
    "C_DecryptDigestUpdate": (("decrypt", "digest"),),
    "C_SignEncryptUpdate": (("sign", "encrypt"),),
    "C_DecryptVerifyUpdate": (("decrypt", "verify"),),
    "C_FindObjects": (("find",),), "C_FindObjectsFinal": (("find",),),
}


@st.composite
def prelude(draw: st.DrawFn, fn: spec.Function, known: Known) -> list[list[Any]]:
    """Nothing, or the well-formed calls that start the operation `fn` belongs to."""
    options = PRELUDES.get(fn.name)
    if not options or not known.sessions or not draw(st.booleans()):
        return []
    inits = _inits(known, known.sessions[0])
    return [inits[name] for name in draw(st.sampled_from(options))]


# -- frames ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """Bytes to send, and what the daemon must do with them.

    expect: "reply" (a request: one reply, [rv, ...]), "close" (a protocol error: the
    connection is closed), "any" (nothing to check but that the daemon lives: the
    frame is incomplete, or garbage that may look like anything)."""

    data: bytes
    expect: str
    request: Any = None
    chunks: int = 1  # sent in this many pieces


def blocks(request: Any) -> bool:
    """A request the daemon may rightly hold without an answer (protocol README:
    C_WaitForSlotEvent without CKF_DONT_BLOCK waits for an event)."""
    if type(request) is not list or not request:
        return False
    code = request[0]
    if code != WAIT_FOR_SLOT_EVENT:  # True == 1 and 1.0 == 1 too; 68 is neither
        return False
    flags = request[1] if len(request) > 1 else None
    return isinstance(flags, int) and not flags & CKF_DONT_BLOCK


@st.composite
def frames(draw: st.DrawFn, known: Known, max_frame: int) -> Frame:
    """One frame for a connection that said hello."""
    kind = draw(st.sampled_from(["request"] * 12 + ["not_request", "empty", "truncated",
                                                     "oversize", "trailing", "garbage",
                                                     "chunked"]))
    if kind in ("request", "chunked"):
        return request_frame(draw(requests(known)), max_frame,
                             draw(st.integers(2, 6)) if kind == "chunked" else 1)
    if kind == "not_request":
        obj = draw(junk().filter(lambda o: not isinstance(o, list)))
        return Frame(frame_bytes(obj), "close", obj)
    if kind == "empty":
        return Frame(frame_bytes([]), "close", [])
    if kind == "truncated":  # the length says more than comes: the daemon waits
        body = pack(draw(requests(known)))
        cut = draw(st.integers(0, max(0, len(body) - 1)))
        return Frame(HEADER.pack(len(body)) + body[:cut], "any")
    if kind == "oversize":
        size = draw(st.integers(max_frame + 1, 2**32 - 1))
        return Frame(HEADER.pack(size) + draw(st.binary(max_size=64)), "close")
    if kind == "trailing":  # one object, then bytes that are not part of it
        body = pack(draw(requests(known))) + draw(st.binary(min_size=1, max_size=16))
        return Frame(HEADER.pack(len(body)) + body, "close")
    return Frame(draw(st.binary(min_size=1, max_size=200)), "any")  # garbage


# -- hellos ---------------------------------------------------------------------------

@st.composite
def bad_hellos(draw: st.DrawFn) -> bytes:
    """The first bytes of a connection, wrong in one way or another."""
    good = {"p11p": 1, "ctx": draw(st.binary(min_size=16, max_size=16)), "pid": 1,
            "prog": "hostile"}
    how = draw(st.sampled_from(["version", "ctx", "pid", "prog", "missing", "extra_keys",
                                "not_a_map", "garbage", "oversize", "request_first"]))
    hello: Any = dict(good)
    if how == "version":
        hello["p11p"] = draw(st.one_of(st.integers(-5, 5).filter(lambda v: v != 1),
                                       st.sampled_from([U64, "1", 1.0, None, b"\x01", True]),
                                       junk()))
        if hello["p11p"] == 1 and type(hello["p11p"]) in (int, bool, float):
            hello["p11p"] = 2
    elif how == "ctx":
        hello["ctx"] = draw(st.one_of(st.binary(max_size=15), st.binary(min_size=17, max_size=40),
                                      st.text(min_size=16, max_size=16), junk()))
    elif how == "pid":
        hello["pid"] = draw(st.one_of(st.text(max_size=4), st.floats(), st.binary(max_size=4),
                                      st.lists(st.integers(-(2**63), U64), max_size=2)))
    elif how == "prog":
        hello["prog"] = draw(st.one_of(st.binary(max_size=8), st.integers(-(2**63), U64), st.none(),
                                       st.lists(st.text(max_size=2), max_size=2)))
    elif how == "missing":
        del hello[draw(st.sampled_from(["p11p", "ctx"]))]
    elif how == "extra_keys":
        hello.update(draw(st.dictionaries(st.text(max_size=6), junk(), min_size=1, max_size=4)))
        hello["p11p"] = draw(st.sampled_from([2, None]))
    elif how == "not_a_map":
        hello = draw(junk().filter(lambda o: not isinstance(o, dict)))
    elif how == "garbage":
        return bytes(draw(st.binary(min_size=1, max_size=64)))
    elif how == "oversize":
        return HEADER.pack(draw(st.integers(2**24 + 1, 2**32 - 1))) + b"\x80"
    elif how == "request_first":
        hello = [draw(st.integers(0, 70)), 1, None]
    return frame_bytes(hello)
