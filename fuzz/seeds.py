"""Seed corpora for the fuzzers, made from protocol/functions.spec and mechanisms.spec
at run time (into build/fuzz/corpus/, never committed):

- dispatch: the msgpack body of a well-formed request of every function (handles as
  the small numbers fuzz_dispatch.py maps to live ones), and batches that start an
  operation and go on with it;
- decoder: the same requests as frames after a hello, in one stream;
- client: for every call of the client harness, selector bytes and a well-formed
  reply (outputs of every kind), a too-small answer and an error answer; the hello's
  welcome; a search.
- helper: for every data-plane function (`@direct`), the helper harness's selector
  bytes (the fake module's answer and lengths) and a well-formed direct-path request
  `[code, id, arg...]`, in every encoding of its arguments; every structured mechanism
  parameter.

    python3 fuzz/seeds.py OUTDIR
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKK, CKM, CKO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_client_calls import calls  # noqa: E402

SESSION, AES, EC_PUB, EC_PRIV, DATA = 1, 2, 3, 4, 5  # fuzz_dispatch.py's handle alphabet
SELECTORS = 12


def le(v: int) -> bytes:
    return struct.pack("<Q", v)


def frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


AES_KEY = [[CKA["CKA_CLASS"], le(CKO["CKO_SECRET_KEY"])], [CKA["CKA_KEY_TYPE"], le(CKK["CKK_AES"])],
           [CKA["CKA_VALUE_LEN"], le(16)], [CKA["CKA_TOKEN"], b"\x00"],
           [CKA["CKA_ENCRYPT"], b"\x01"],
           [CKA["CKA_WRAP_TEMPLATE"], [[CKA["CKA_CLASS"], le(CKO["CKO_SECRET_KEY"])]]]]
MECHS = {
    "C_EncryptInit": [CKM["CKM_AES_CBC_PAD"], b"\0" * 16],
    "C_DecryptInit": [CKM["CKM_AES_GCM"], [b"\0" * 12, 96, b"aad", 128]],
    "C_DigestInit": [CKM["CKM_SHA256"], None],
    "C_SignInit": [CKM["CKM_ECDSA"], None],
    "C_VerifyInit": [CKM["CKM_AES_CMAC"], None],
    "C_SignRecoverInit": [CKM["CKM_RSA_PKCS"], None],
    "C_VerifyRecoverInit": [CKM["CKM_RSA_PKCS"], None],
    "C_GenerateKey": [CKM["CKM_AES_KEY_GEN"], None],
    "C_GenerateKeyPair": [CKM["CKM_EC_KEY_PAIR_GEN"], None],
    "C_WrapKey": [CKM["CKM_AES_KEY_WRAP"], None],
    "C_UnwrapKey": [CKM["CKM_AES_KEY_WRAP"], None],
    "C_DeriveKey": [CKM["CKM_ECDH1_DERIVE"], [1, None, b"\x04" + b"\x01" * 64]],
}
VALUES = {"ulong": 0, "bbool": 1, "slot": 0, "session": SESSION, "object": AES,
          "bytes": b"0123456789abcdef", "pin": b"0000", "label32": b" " * 32,
          "template": AES_KEY, "out_bytes": 256, "out_random": 16, "out_ulong": 0,
          "out_slot": 0, "out_session": 0, "out_object": 0, "out_slots": 16, "out_mechs": 128,
          "out_objects": 16, "out_info": 0, "out_slot_info": 0, "out_token_info": 0,
          "out_mech_info": 0, "out_session_info": 0,
          "template_get": [[CKA["CKA_VALUE"], 32], [CKA["CKA_LABEL"], None],
                           [CKA["CKA_WRAP_TEMPLATE"], [[CKA["CKA_CLASS"], 8]]]]}


def request(fn: spec.Function) -> list[Any]:
    args = []
    for a in fn.wire_args:
        if a.kind == "mechanism":
            args.append(MECHS.get(fn.name, [CKM["CKM_SHA256"], None]))
        else:
            args.append(VALUES[a.kind])
    if fn.name == "C_OpenSession":
        args[1] = 6
    if fn.name == "C_Login":
        args[2] = b"fuzz-pin-3370"  # the token's (fuzz_dispatch.py)
    return [fn.code, *args]


# Every other encoding the protocol allows for a kind (protocol/README.md, "Argument
# kinds"): nil for NULL, an int for NULL with a length, attribute values NULL with a
# length (nested ones too), a structured mechanism's parameter as plain bytes.
VARIANTS: dict[str, list[Any]] = {
    "bytes": [None, 16], "pin": [None, 4], "label32": [None],
    "template": [None, 3, [[CKA["CKA_CLASS"], 8], [CKA["CKA_KEY_TYPE"], 8], [CKA["CKA_VALUE"], 16]],
                 [[CKA["CKA_CLASS"], le(CKO["CKO_SECRET_KEY"])],
                  [CKA["CKA_WRAP_TEMPLATE"], [[CKA["CKA_CLASS"], 8], [CKA["CKA_LABEL"], None]]]]],
    "template_get": [None, 2, [[CKA["CKA_VALUE"], None], [CKA["CKA_WRAP_TEMPLATE"], None]]],
    "mechanism": [None, [CKM["CKM_AES_GCM"], b"\xef\xbe\xad\xde\x00\x10\x00\x00" * 6],
                  [CKM["CKM_ECDH1_DERIVE"], b"\x01" * 40]],
    "out_bytes": [None, 0], "out_random": [None, 0], "out_slots": [None, 0], "out_mechs": [None],
    "out_objects": [None, 0], "out_ulong": [None], "out_object": [None], "out_session": [None],
}


def variants(fn: spec.Function) -> list[list[Any]]:
    """The request of `fn` once per other encoding of each of its arguments."""
    base = request(fn)
    out = []
    for i, a in enumerate(fn.wire_args, 1):
        for v in VARIANTS.get(a.kind, []):
            r = list(base)
            r[i] = v
            out.append(r)
    return out


def requests() -> list[Any]:
    out: list[Any] = [request(f) for f in spec.functions()]
    out += [r for f in spec.functions() for r in variants(f)]
    out.append([1001, SESSION, [[CKA["CKA_CLASS"], le(CKO["CKO_SECRET_KEY"])]]])
    by = spec.by_name()
    for mtype, m in spec.mechanisms().items():  # every structured parameter
        fields = {"ulong": 1, "bbool": 0, "bytes": b"0123456789ab", "fixed16": b"\0" * 16,
                  "fixed8": b"\0" * 8, "object": AES}
        out.append([by["C_EncryptInit"].code, SESSION,
                    [mtype, [fields[f.kind] for f in m.param.fields]], AES])
    for init, then in (("C_EncryptInit", ["C_EncryptUpdate", "C_EncryptFinal"]),
                       ("C_DigestInit", ["C_DigestUpdate", "C_DigestFinal"]),
                       ("C_SignInit", ["C_Sign"]), ("C_VerifyInit", ["C_VerifyUpdate", "C_VerifyFinal"]),
                       ("C_FindObjectsInit", ["C_FindObjects", "C_FindObjectsFinal"])):
        out.append([request(by[init])] + [request(by[n]) for n in then])
    return out


# -- client replies --------------------------------------------------------------------

INFO = {
    "out_info": [[2, 40], b" " * 32, 0, b" " * 32, [1, 0]],
    "out_slot_info": [b" " * 64, b" " * 32, 1, [0, 1], [0, 1]],
    "out_token_info": [b" " * 32, b" " * 32, b" " * 16, b" " * 16, 0x40d, 10, 1, 10, 1, 255,
                       4, 2**64 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1, [0, 1], [2, 6],
                       b"0" * 16],
    "out_mech_info": [128, 256, 0x300],
    "out_session_info": [0, 3, 6, 0],
}


def _reply_out(kind: str) -> Any:
    """A reply value for one output of the harness's all-0x10 argument shapes."""
    if kind == "out_bytes":
        return b"x" * 8
    if kind == "out_random":
        return b"r" * 16
    if kind in ("out_ulong", "out_slot", "out_session", "out_object"):
        return 7
    if kind in ("out_slots", "out_mechs"):
        return [1, 2, 3]
    if kind == "out_objects":
        return [5, 6]
    if kind in INFO:
        return INFO[kind]
    if kind == "template_get":
        return []
    raise AssertionError(kind)


def client_inputs() -> list[bytes]:
    out = []
    fns = calls()
    for i, fn in enumerate(fns):
        outs = fn.outputs
        for sel, reply in (
                (b"\x10" * SELECTORS, [0, *(_reply_out(a.kind) for a in outs)]),
                (b"\x90" * SELECTORS, [0, *(16 for _ in outs)]),
                (b"\x01" * SELECTORS, [0x150, *(64 for _ in outs)]),
                (b"\x10" * SELECTORS, [7])):
            out.append(bytes([i]) + sel + msgpack.packb(reply, use_bin_type=True))
    get = next(i for i, f in enumerate(fns) if f.name == "C_GetAttributeValue")
    # two attributes: CKA_VALUE with room for 16, a wrap template with one inner value
    sel = bytes([1, 2, 0x02, 0x10, 0x00, 0x01, 0x03, 0x08, 0x00, 0, 0, 0])
    out.append(bytes([get]) + sel + msgpack.packb(
        [0, [b"v" * 5, [[CKA["CKA_VALUE"], b"i" * 4]]]], use_bin_type=True))
    out.append(bytes([len(fns)]) + b"\x01" + b"\x10" * (SELECTORS - 1)
               + msgpack.packb([0, [9, 10, 11]], use_bin_type=True))
    out.append(b"\xf0" + frame({"p11p": 1}))
    out.append(b"\xf0" + frame({"p11p": 1, "error": "refused"}))
    # the negotiated answer (protocol/README.md "Client link: hello"): features both
    # know, one the library does not know, a refusal naming the daemon's range, a version
    # outside the library's
    out.append(b"\xf0" + frame({"p11p": 1, "features": []}))
    out.append(b"\xf0" + frame({"p11p": 1, "features": ["later", 7, None]}))
    out.append(b"\xf0" + frame({"p11p": 3, "max": 5, "error": "no protocol version in common: "
                                 "the client speaks 1, this daemon 3..5"}))
    out.append(b"\xf0" + frame({"p11p": 2, "features": ["x"]}))
    # a mailbox's replies (client/box.c): the length the helper claims, then the area:
    # one reply, a pair's two, a claim past what is there
    one, two = frame([0, b"sig" * 20]), frame([0]) + frame([0, b"x" * 64])
    out.append(b"\xe0" + len(one).to_bytes(4, "big") + one)
    out.append(b"\xe1" + len(two).to_bytes(4, "big") + two)
    out.append(b"\xe1" + (len(two) + 9).to_bytes(4, "big") + two)
    return out


# -- the helper's direct path ----------------------------------------------------------

HELPER_SELECTORS = (b"\x00\x00\x00\x20", b"\x01\x01\x00\x40", b"\x02\x02\x00\x08",
                    b"\x00\x03\x00\x10", b"\x04\x00\x01\x10", b"\x00\x01\x00\xf4")


MAILBOX_SELECTOR = b"\x00\x00\x80\x20"


def helper_inputs() -> list[bytes]:
    direct = {f.code for f in spec.direct_functions()}
    out = []
    bodies: list[bytes] = []
    for r in requests():
        if not r or type(r[0]) is list or r[0] not in direct:
            continue
        body = msgpack.packb([r[0], 4097, *r[2:]], use_bin_type=True)  # a binding id
        out += [sel + body for sel in HELPER_SELECTORS]
        bodies.append(body)
    # mailbox copies (selector byte 2, bit 7): one frame each, and pairs (an init and
    # the next call travel together)
    frame = [len(b).to_bytes(4, "big") for b in bodies]
    out += [MAILBOX_SELECTOR + frame[i] + b for i, b in enumerate(bodies)]
    out += [MAILBOX_SELECTOR + frame[i] + bodies[i] + frame[i + 1] + bodies[i + 1]
            for i in range(0, len(bodies) - 1, 2)]
    return out


def write(outdir: Path) -> dict[str, int]:
    corpora: dict[str, list[bytes]] = {
        "dispatch": [msgpack.packb(r, use_bin_type=True) for r in requests()],
        "decoder": [], "client": client_inputs(), "helper": helper_inputs()}
    hello_map = {"p11p": 1, "ctx": b"c" * 16, "pid": 1, "prog": "fuzz"}
    hello = frame(hello_map)
    for r in requests():
        if r and type(r[0]) is list:
            continue
        corpora["decoder"].append(b"\x07" * 8 + hello + frame(r) + frame(r))
    corpora["decoder"].append(b"\x00" * 8 + hello)
    # hellos that negotiate: a range and features, a range of versions the daemon does
    # not speak, max below p11p
    for offer in ({"max": 5, "features": ["later"]}, {"p11p": 3, "max": 5}, {"p11p": 2, "max": 1}):
        corpora["decoder"].append(b"\x00" * 8 + frame({**hello_map, **offer})
                                  + frame([5, 1, None]))
    counts = {}
    for name, items in corpora.items():
        d = outdir / name
        d.mkdir(parents=True, exist_ok=True)
        for item in items:
            (d / hashlib.sha1(item).hexdigest()).write_bytes(item)
        counts[name] = len(items)
    return counts


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
