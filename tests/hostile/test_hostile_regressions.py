"""What the hostile-input tests found, one case each, so that it stays fixed:

- an input attribute with a NULL value and a non-zero length (the protocol's int
  value) crashed SoftHSM2 in the helper (C_CreateObject, C_GenerateKey,
  C_FindObjectsInit, nested templates too); the helper's death failed the member for
  every application. The daemon now answers CKR_ATTRIBUTE_VALUE_INVALID.
- a mechanism of mechanisms.spec with a bin parameter reached the module, which read
  the bytes as its structure and followed the pointers in them (SIGSEGV with AES-GCM).
  The daemon now answers CKR_MECHANISM_PARAM_INVALID.
- CKR_GENERAL_ERROR for odd arguments (an EC key pair on an unknown curve) marked the
  member failed, and the call, retried after each recovery, took the group out of
  service for everybody for 20 s. The daemon now asks the member a plain question
  first; one that answers is not failed, and the application gets the code.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hostile_arena import Arena, le
from hostile_frames import Known
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKK, CKM, CKO, CKR

TEMPLATE_FUNCTIONS = [f for f in spec.functions()
                      if any(a.kind == "template" for a in f.wire_args)]
POINTERS = b"\xef\xbe\xad\xde\x00\x10\x00\x00" * 8  # what a C structure's pointers look like


def _request(fn: spec.Function, known: Known, template: list[Any]) -> list[Any]:
    """A plausible request of `fn` with `template` in every template argument."""
    k = known.keys
    mechs = {"C_GenerateKey": [CKM["CKM_AES_KEY_GEN"], None],
             "C_GenerateKeyPair": [CKM["CKM_EC_KEY_PAIR_GEN"], None],
             "C_UnwrapKey": [CKM["CKM_AES_KEY_WRAP"], None],
             "C_DeriveKey": [CKM["CKM_AES_ECB_ENCRYPT_DATA"], [b"d" * 16]]}
    values = {"session": known.sessions[0], "object": k["aes"], "bytes": b"w" * 24,
              "template": template, "mechanism": mechs.get(fn.name), "out_object": 0}
    return [fn.code, *(values[a.kind] for a in fn.wire_args)]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("fn", TEMPLATE_FUNCTIONS + ["FIND_ALL"],
                         ids=lambda f: f if isinstance(f, str) else f.name)
def test_null_attribute_value_with_length_is_refused(served: Arena, fn: Any, nested: bool) -> None:
    poisoned: list[Any] = [[CKA["CKA_CLASS"], 8], [CKA["CKA_KEY_TYPE"], 8],
                           [CKA["CKA_VALUE"], 16]]
    if nested:
        poisoned = [[CKA["CKA_CLASS"], le(CKO["CKO_SECRET_KEY"])],
                    [CKA["CKA_KEY_TYPE"], le(CKK["CKK_AES"])],
                    [CKA["CKA_WRAP_TEMPLATE"], [[CKA["CKA_LABEL"], b"x"],
                                                [CKA["CKA_UNWRAP_TEMPLATE"], poisoned]]]]
    with served.connect() as w:
        known = served.prepare(w)
        req = ([1001, known.sessions[0], poisoned] if fn == "FIND_ALL"
               else _request(fn, known, poisoned))
        reply = w.call(req)
        assert reply[0] == CKR["CKR_ATTRIBUTE_VALUE_INVALID"], (req, reply)
        assert w.call([65, known.sessions[0], 8])[0] == CKR["CKR_OK"]  # the session goes on
    served.assert_serving()


@pytest.mark.parametrize("mtype", sorted(spec.mechanisms()),
                         ids=lambda m: spec.mechanisms()[m].name)
def test_structured_mechanism_parameter_as_bytes_is_refused(served: Arena, mtype: int) -> None:
    size = 16 * len(spec.mechanisms()[mtype].param.fields)
    with served.connect() as w:
        known = served.prepare(w)
        h, k = known.sessions[0], known.keys
        for req in ([30, h, [mtype, POINTERS[:size]], k["aes"]],
                    [43, h, [mtype, POINTERS[:size]], k["rsa_priv"]],
                    [63, h, [mtype, POINTERS], k["ec_priv"], [], 0]):
            reply = w.call(req)
            assert reply[0] == CKR["CKR_MECHANISM_PARAM_INVALID"], (req, reply)
    served.assert_serving()


def test_general_error_of_one_call_fails_no_member(served: Arena) -> None:
    with served.connect() as w:
        known = served.prepare(w)
        t = time.monotonic()
        for curve in (b"\x06\x03+ep", b"\x06"):  # an OID SoftHSM2 cannot make keys on
            reply = w.call([60, known.sessions[0], [CKM["CKM_EC_KEY_PAIR_GEN"], None],
                            [[CKA["CKA_EC_PARAMS"], curve]], [[CKA["CKA_SIGN"], b"\x01"]], 0, 0])
            assert reply[0] == CKR["CKR_GENERAL_ERROR"], reply
        assert time.monotonic() - t < 5  # answered, not held through recoveries
    served.assert_serving()  # includes: no "member failure detected" in the log
