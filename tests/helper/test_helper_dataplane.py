"""The direct path's data plane (helper/fast.c, with the codec generated from
protocol/functions.spec by helper/gen_fast.py): every `@direct` function driven on the
helper's socket with a bound session, against SoftHSM2.

Each result is compared with the same call made on the helper's pipe, on a second
session of the same helper (the module's own answer through the helper's cffi calls,
the daemon plane's codec), and, where the key is known, with Python's own
cryptography. Length queries and CKR_BUFFER_TOO_SMALL come back as the module gives
them. A request of the wrong shape for any of these functions closes its connection,
and the helper serves on."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from helperfixtures import *  # noqa: F403  (the fixtures)
from helperlink import (
    FALSE,
    SOFTHSM_SO,
    TRUE,
    HelperLink,
    SoftHSMDir,
    closed,
    recv_exact,
    template,
    ulong,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from p11p.daemon.shapes import SHAPES, unsafe_arguments
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKK, CKM, CKO, CKR

FAST_START, FAST_ALLOW, FAST_REVOKE, FAST_SERVED, PING = -2, -3, -4, -5, -1
CODE = {f.name: f.code for f in spec.functions()}
DIRECT = spec.direct_functions()
OK = CKR["CKR_OK"]
TOO_SMALL = CKR["CKR_BUFFER_TOO_SMALL"]
UNAVAILABLE = 2**64 - 1
P256 = bytes.fromhex("06082a8648ce3d030107")
AES_KEY = bytes(range(16))
HMAC_KEY = b"k" * 32


def trimmed(reply: list[Any]) -> list[Any]:
    """A reply without its trailing nil outputs: the error answer [rv] and [rv, nil...]
    mean the same (protocol/README.md, "Client link: calls")."""
    out = list(reply)
    while len(out) > 1 and out[-1] is None:
        out.pop()
    return out


class Planes:
    """One helper with its direct path listening: session `a` bound (its id), session
    `b` spoken to on the pipe; both logged in, sharing the keys made here."""

    def __init__(self, helper: HelperLink) -> None:
        self.helper = helper
        self.name = b"p11p-dataplane-" + secrets.token_hex(6).encode()
        self.token = secrets.token_bytes(16)
        assert helper.call(FAST_START, self.name, self.token, os.getuid()) == [OK]
        slot = helper.token_slot()
        self.a = helper.open_session(slot)
        self.b = helper.open_session(slot)
        (self.id,) = helper.ok(FAST_ALLOW, self.a)
        self.sock = self.connect()
        secret = CKO["CKO_SECRET_KEY"]
        self.aes = self.create(CLASS=ulong(secret), KEY_TYPE=ulong(CKK["CKK_AES"]), TOKEN=FALSE,
                               VALUE=AES_KEY, ENCRYPT=TRUE, DECRYPT=TRUE, SENSITIVE=TRUE,
                               LABEL=b"dataplane-aes")
        self.hmac = self.create(CLASS=ulong(secret), KEY_TYPE=ulong(CKK["CKK_GENERIC_SECRET"]),
                                TOKEN=FALSE, VALUE=HMAC_KEY, SIGN=TRUE, VERIFY=TRUE,
                                LABEL=b"dataplane-hmac")
        pub, priv = helper.ok(CODE["C_GenerateKeyPair"], self.b, [CKM["CKM_EC_KEY_PAIR_GEN"], None],
                              template(TOKEN=FALSE, EC_PARAMS=P256, VERIFY=TRUE),
                              template(TOKEN=FALSE, PRIVATE=TRUE, SIGN=TRUE), 0, 0)
        self.ec_pub, self.ec_priv = int(pub), int(priv)
        point = helper.get_attributes(self.b, pub, [CKA["CKA_EC_POINT"]])[CKA["CKA_EC_POINT"]]
        self.ec_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
        pub, priv = helper.ok(CODE["C_GenerateKeyPair"], self.b,
                              [CKM["CKM_RSA_PKCS_KEY_PAIR_GEN"], None],
                              template(TOKEN=FALSE, MODULUS_BITS=ulong(1024),
                                       PUBLIC_EXPONENT=b"\x01\x00\x01", VERIFY=TRUE,
                                       VERIFY_RECOVER=TRUE, ENCRYPT=TRUE),
                              template(TOKEN=FALSE, PRIVATE=TRUE, SIGN=TRUE, SIGN_RECOVER=TRUE,
                                       DECRYPT=TRUE), 0, 0)
        self.rsa_pub, self.rsa_priv = int(pub), int(priv)
        attrs = helper.get_attributes(self.b, pub, [CKA["CKA_MODULUS"], CKA["CKA_PUBLIC_EXPONENT"]])
        self.rsa_public = RSAPublicNumbers(int.from_bytes(attrs[CKA["CKA_PUBLIC_EXPONENT"]], "big"),
                                           int.from_bytes(attrs[CKA["CKA_MODULUS"]], "big")).public_key()

    def create(self, **attrs: bytes) -> int:
        (handle,) = self.helper.ok(CODE["C_CreateObject"], self.b, template(**attrs), 0)
        return int(handle)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(b"\0" + self.name)
        s.sendall(self.token)
        return s

    def fast(self, name: str, *args: Any) -> list[Any]:
        """One call on the direct path, the binding id where the session goes."""
        body = msgpack.packb([CODE[name], self.id, *args], use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        size = struct.unpack(">I", recv_exact(self.sock, 4))[0]
        reply: list[Any] = msgpack.unpackb(recv_exact(self.sock, size), raw=False)
        return reply

    def pipe(self, name: str, *args: Any) -> list[Any]:
        """The same call on the helper's pipe, on session b."""
        return self.helper.call(CODE[name], self.b, *args)

    def both(self, name: str, *args: Any) -> list[Any]:
        """The call on both planes; their answers must be the same. The direct one."""
        direct, piped = self.fast(name, *args), self.pipe(name, *args)
        assert trimmed(direct) == trimmed(piped), (name, direct, piped)
        return direct


@pytest.fixture(scope="module")
def planes(hsm: SoftHSMDir) -> Iterator[Planes]:
    link = HelperLink(SOFTHSM_SO, hsm.env)
    try:
        yield Planes(link)
    finally:
        link.stop()


def test_every_direct_function_is_served() -> None:
    """What the spec marks @direct is the data plane issue 13 names."""
    names = {f.name for f in DIRECT}
    for family in ("Encrypt", "Decrypt", "Digest", "Sign", "Verify"):
        assert {f"C_{family}Init", f"C_{family}", f"C_{family}Update", f"C_{family}Final"} <= names
    assert {"C_SignRecoverInit", "C_SignRecover", "C_VerifyRecoverInit", "C_VerifyRecover",
            "C_GenerateRandom", "C_SeedRandom", "C_GetAttributeValue", "C_GetSessionInfo",
            "C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal"} <= names
    assert "C_DigestKey" not in names and "C_Login" not in names


def test_digest_one_shot_and_multi_part(planes: Planes) -> None:
    data = b"the data plane" * 50
    sha = hashlib.sha256(data).digest()
    sha256 = [CKM["CKM_SHA256"], None]
    assert planes.both("C_DigestInit", sha256) == [OK]
    assert planes.both("C_Digest", data, None) == [OK, 32]  # the length first
    assert planes.both("C_Digest", data, 31) == [TOO_SMALL, 32]
    assert planes.both("C_Digest", data, 2**64 - 1) == [OK, sha]  # a capacity past the bound
    assert planes.both("C_Digest", data, 32) == [CKR["CKR_OPERATION_NOT_INITIALIZED"]]
    assert planes.both("C_DigestInit", sha256) == [OK]
    for i in range(0, len(data), 128):
        assert planes.both("C_DigestUpdate", data[i:i + 128]) == [OK]
    assert planes.both("C_DigestFinal", None) == [OK, 32]
    assert planes.both("C_DigestFinal", 0) == [TOO_SMALL, 32]
    assert planes.both("C_DigestFinal", 64) == [OK, sha]
    # an empty input is a real (non-NULL, 0) buffer; nil is (NULL, 0)
    assert planes.both("C_DigestInit", sha256) == [OK]
    assert planes.both("C_Digest", b"", 32) == [OK, hashlib.sha256(b"").digest()]
    assert planes.both("C_DigestInit", sha256) == [OK]
    planes.both("C_Digest", None, 32)
    planes.both("C_DigestFinal", 32)  # whatever the module left: the same on both


def test_encrypt_decrypt_aes_cbc_pad_and_ecb(planes: Planes) -> None:
    iv = bytes(range(100, 116))
    data = b"sixteen bytes..." * 5 + b"and a tail"
    enc = Cipher(algorithms.AES(AES_KEY), modes.CBC(iv)).encryptor()
    padder = padding.PKCS7(128).padder()
    expected = enc.update(padder.update(data) + padder.finalize()) + enc.finalize()
    cbc = [CKM["CKM_AES_CBC_PAD"], iv]
    # one-shot, with the length query and a buffer too small
    assert planes.both("C_EncryptInit", cbc, planes.aes) == [OK]
    rv, need = planes.both("C_Encrypt", data, None)
    assert rv == OK and need >= len(expected)
    assert planes.both("C_Encrypt", data, 8)[0] == TOO_SMALL
    assert planes.both("C_Encrypt", data, need) == [OK, expected]
    # multi-part
    assert planes.both("C_EncryptInit", cbc, planes.aes) == [OK]
    parts = [planes.both("C_EncryptUpdate", data[:40], 64), planes.both("C_EncryptUpdate", data[40:], 64)]
    assert [p[0] for p in parts] == [OK, OK]
    rv, last_len = planes.both("C_EncryptFinal", None)
    assert rv == OK and last_len == 16
    assert planes.both("C_EncryptFinal", 0) == [TOO_SMALL, 16]
    rv, last = planes.both("C_EncryptFinal", 64)
    assert rv == OK and parts[0][1] + parts[1][1] + last == expected
    # and back
    assert planes.both("C_DecryptInit", cbc, planes.aes) == [OK]
    rv, need = planes.both("C_Decrypt", expected, None)
    assert rv == OK and need >= len(data)
    assert planes.both("C_Decrypt", expected, len(expected)) == [OK, data]
    assert planes.both("C_DecryptInit", cbc, planes.aes) == [OK]
    got = b""
    for i in range(0, len(expected), 32):
        rv, part = planes.both("C_DecryptUpdate", expected[i:i + 32], 64)
        assert rv == OK
        got += part
    rv, last = planes.both("C_DecryptFinal", 64)
    assert rv == OK and got + last == data
    # AES-ECB, no parameter
    block = b"0123456789abcdef" * 2
    enc = Cipher(algorithms.AES(AES_KEY), modes.ECB()).encryptor()
    ecb_expected = enc.update(block) + enc.finalize()
    ecb = [CKM["CKM_AES_ECB"], None]
    assert planes.both("C_EncryptInit", ecb, planes.aes) == [OK]
    assert planes.both("C_Encrypt", block, 32) == [OK, ecb_expected]
    assert planes.both("C_DecryptInit", ecb, planes.aes) == [OK]
    assert planes.both("C_Decrypt", ecb_expected, 31) == [TOO_SMALL, 32]
    assert planes.both("C_Decrypt", ecb_expected, 32) == [OK, block]
    # an error of the module comes back as it is
    assert planes.both("C_EncryptInit", ecb, 0xdead)[0] != OK
    assert planes.both("C_Encrypt", block, 32) == [CKR["CKR_OPERATION_NOT_INITIALIZED"]]


def test_structured_mechanism_parameters(planes: Planes) -> None:
    """AES-GCM's CK_GCM_PARAMS travels field by field and is built by the generated
    builder; the same structure as raw bytes is refused on both planes (and by the
    daemon) with CKR_MECHANISM_PARAM_INVALID."""
    iv, aad, data = b"\x01" * 12, b"header", b"gcm plaintext"
    expected = AESGCM(AES_KEY).encrypt(iv, data, aad)
    gcm = [CKM["CKM_AES_GCM"], [iv, 96, aad, 128]]
    assert planes.both("C_EncryptInit", gcm, planes.aes) == [OK]
    assert planes.both("C_Encrypt", data, 64) == [OK, expected]
    assert planes.both("C_DecryptInit", gcm, planes.aes) == [OK]
    assert planes.both("C_Decrypt", expected, 64) == [OK, data]
    as_bytes = [CKM["CKM_AES_GCM"], struct.pack("=QQQQQQ", 0, 12, 96, 0, 6, 128)]
    refused = CKR["CKR_MECHANISM_PARAM_INVALID"]
    assert planes.both("C_EncryptInit", as_bytes, planes.aes) == [refused]
    code = CODE["C_EncryptInit"]
    err = unsafe_arguments(SHAPES[code], [code, 1, as_bytes, planes.aes])
    assert err is not None and err.rv == refused
    # fields of the wrong shape: a protocol error, the connection closes
    s = planes.connect()
    try:
        body = msgpack.packb([code, planes.id, [CKM["CKM_AES_GCM"], [iv, 96, aad]], planes.aes])
        s.sendall(struct.pack(">I", len(body)) + body)
        assert closed(s)
    finally:
        s.close()


def test_sign_verify_hmac_and_ecdsa(planes: Planes) -> None:
    data = b"message to authenticate" * 7
    mac = hmac.new(HMAC_KEY, data, "sha256").digest()
    mech = [CKM["CKM_SHA256_HMAC"], None]
    assert planes.both("C_SignInit", mech, planes.hmac) == [OK]
    assert planes.both("C_Sign", data, None) == [OK, 32]
    assert planes.both("C_Sign", data, 16) == [TOO_SMALL, 32]
    assert planes.both("C_Sign", data, 32) == [OK, mac]
    assert planes.both("C_SignInit", mech, planes.hmac) == [OK]
    assert planes.both("C_SignUpdate", data[:50]) == [OK]
    assert planes.both("C_SignUpdate", data[50:]) == [OK]
    assert planes.both("C_SignFinal", None) == [OK, 32]
    assert planes.both("C_SignFinal", 1) == [TOO_SMALL, 32]
    assert planes.both("C_SignFinal", 32) == [OK, mac]
    assert planes.both("C_VerifyInit", mech, planes.hmac) == [OK]
    assert planes.both("C_Verify", data, mac) == [OK]
    assert planes.both("C_VerifyInit", mech, planes.hmac) == [OK]
    assert planes.both("C_Verify", data, bytes(32)) == [CKR["CKR_SIGNATURE_INVALID"]]
    assert planes.both("C_VerifyInit", mech, planes.hmac) == [OK]
    assert planes.both("C_VerifyUpdate", data[:10]) == [OK]
    assert planes.both("C_VerifyUpdate", data[10:]) == [OK]
    assert planes.both("C_VerifyFinal", mac) == [OK]
    assert planes.both("C_VerifyFinal", mac) == [CKR["CKR_OPERATION_NOT_INITIALIZED"]]
    # ECDSA signatures differ each time: each plane verifies the other's, and so does
    # Python's cryptography
    digest = hashlib.sha256(data).digest()
    ecdsa = [CKM["CKM_ECDSA"], None]
    assert planes.both("C_SignInit", ecdsa, planes.ec_priv) == [OK]
    rv, direct_sig = planes.fast("C_Sign", digest, 64)
    rv2, piped_sig = planes.pipe("C_Sign", digest, 64)
    assert rv == rv2 == OK and len(direct_sig) == len(piped_sig) == 64
    for sig in (direct_sig, piped_sig):
        der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        planes.ec_public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert planes.both("C_VerifyInit", ecdsa, planes.ec_pub) == [OK]
    assert planes.fast("C_Verify", digest, piped_sig) == [OK]
    assert planes.pipe("C_Verify", digest, direct_sig) == [OK]


def test_sign_recover_and_verify_recover(planes: Planes) -> None:
    """RSA PKCS#1 v1.5 and X.509 with recovery, as far as SoftHSM2 offers them: the
    direct path answers what the module answers, whatever that is; what it signs, the
    public key recovers."""
    data = b"recover me"
    n = planes.rsa_public.public_numbers().n
    for mech in ([CKM["CKM_RSA_PKCS"], None], [CKM["CKM_RSA_X_509"], None]):
        sig = bytes(127) + b"\x01"
        if planes.both("C_SignRecoverInit", mech, planes.rsa_priv) == [OK]:
            assert planes.both("C_SignRecover", data, None) == [OK, 128]
            assert planes.both("C_SignRecover", data, 64) == [TOO_SMALL, 128]
            rv, sig = planes.both("C_SignRecover", data, 128)
            assert rv == OK and pow(int.from_bytes(sig, "big"), 65537, n).to_bytes(128, "big").endswith(data)
        if planes.both("C_VerifyRecoverInit", mech, planes.rsa_pub) == [OK]:
            rv, need = planes.both("C_VerifyRecover", sig, None)
            assert rv == OK and need >= len(data)
            planes.both("C_VerifyRecover", sig, 1)
            if planes.both("C_VerifyRecoverInit", mech, planes.rsa_pub) == [OK]:
                rv, recovered = planes.both("C_VerifyRecover", sig, 128)
                assert rv == OK and recovered.endswith(data)


def test_get_attribute_value(planes: Planes) -> None:
    t = CKA
    # lengths first; a value that fits; one that does not (the module says how long);
    # a sensitive one; an unknown type
    query = [[t["CKA_KEY_TYPE"], None], [t["CKA_LABEL"], None], [t["CKA_VALUE_LEN"], None]]
    rv, lengths = planes.both("C_GetAttributeValue", planes.aes, query)
    assert rv == OK and lengths == [8, len(b"dataplane-aes"), 8]
    request = [[t["CKA_KEY_TYPE"], 8], [t["CKA_LABEL"], 64], [t["CKA_VALUE_LEN"], 8]]
    assert planes.both("C_GetAttributeValue", planes.aes, request) == [
        OK, [ulong(CKK["CKK_AES"]), b"dataplane-aes", ulong(16)]]
    rv, values = planes.both("C_GetAttributeValue", planes.aes, [[t["CKA_LABEL"], 4]])
    assert rv == TOO_SMALL and values == [UNAVAILABLE]
    rv, values = planes.both("C_GetAttributeValue", planes.aes,
                             [[t["CKA_VALUE"], 16], [t["CKA_LABEL"], 64]])
    assert rv == CKR["CKR_ATTRIBUTE_SENSITIVE"] and values == [UNAVAILABLE, b"dataplane-aes"]
    rv, values = planes.both("C_GetAttributeValue", planes.aes, [[0x7fff0001, 8]])
    assert rv == CKR["CKR_ATTRIBUTE_TYPE_INVALID"] and values == [UNAVAILABLE]
    # a template attribute: its count, then its inner attributes
    rv, values = planes.both("C_GetAttributeValue", planes.aes, [[t["CKA_WRAP_TEMPLATE"], None]])
    assert rv in (OK, CKR["CKR_ATTRIBUTE_TYPE_INVALID"])
    planes.both("C_GetAttributeValue", planes.aes, [[t["CKA_WRAP_TEMPLATE"], [[t["CKA_CLASS"], 8]]]])
    # a public key's values; a capacity past the bound; an empty template; nil
    rv, values = planes.both("C_GetAttributeValue", planes.rsa_pub,
                             [[t["CKA_MODULUS"], 2**64 - 1], [t["CKA_PUBLIC_EXPONENT"], 0]])
    assert rv == TOO_SMALL and len(values[0]) == 128 and values[1] == UNAVAILABLE
    assert planes.both("C_GetAttributeValue", planes.aes, []) == [OK, []]
    planes.both("C_GetAttributeValue", planes.aes, None)
    assert planes.both("C_GetAttributeValue", 0xdead, query)[0] == CKR["CKR_OBJECT_HANDLE_INVALID"]


def test_get_session_info(planes: Planes) -> None:
    rv, info = planes.both("C_GetSessionInfo", 0)
    assert rv == OK and len(info) == 4
    planes.both("C_GetSessionInfo", None)  # NULL: whatever the module says, alike


def test_find_objects(planes: Planes) -> None:
    by_label = [[CKA["CKA_LABEL"], b"dataplane-aes"]]
    assert planes.both("C_FindObjectsInit", by_label) == [OK]
    assert planes.both("C_FindObjectsInit", by_label) == [CKR["CKR_OPERATION_ACTIVE"]]
    assert planes.both("C_FindObjects", 10) == [OK, [planes.aes]]
    assert planes.both("C_FindObjects", 10) == [OK, []]
    assert planes.both("C_FindObjectsFinal") == [OK]
    assert planes.both("C_FindObjects", 10) == [CKR["CKR_OPERATION_NOT_INITIALIZED"]]
    # every secret key, in batches of one; a NULL template finds everything
    secret = [[CKA["CKA_CLASS"], ulong(CKO["CKO_SECRET_KEY"])]]
    assert planes.both("C_FindObjectsInit", secret) == [OK]
    found = [planes.both("C_FindObjects", 1) for _ in range(3)]
    assert sorted(h for r in found for h in r[1]) == sorted([planes.aes, planes.hmac])
    assert planes.both("C_FindObjects", 0) == [OK, []]
    assert planes.both("C_FindObjectsFinal") == [OK]
    assert planes.both("C_FindObjectsInit", None) == [OK]
    rv, handles = planes.both("C_FindObjects", 2**64 - 1)  # room past the bound: lowered
    assert rv == OK and {planes.aes, planes.hmac, planes.ec_pub, planes.rsa_pub} <= set(handles)
    assert planes.both("C_FindObjectsFinal") == [OK]
    # nested templates travel as arrays
    nested = [[CKA["CKA_WRAP_TEMPLATE"], [[CKA["CKA_CLASS"], ulong(CKO["CKO_SECRET_KEY"])]]]]
    planes.both("C_FindObjectsInit", nested)
    planes.both("C_FindObjectsFinal")


def test_a_template_attribute_null_with_a_length_is_refused_as_by_the_daemon(planes: Planes) -> None:
    """The module would read through a NULL value with a length: the direct path
    refuses it with the daemon's answer (shapes.unsafe_arguments), at any depth, and the
    module never sees it (the helper's pipe has no such check: it is never sent there)."""
    code = CODE["C_FindObjectsInit"]
    for template_ in ([[CKA["CKA_LABEL"], 64]],
                      [[CKA["CKA_UNWRAP_TEMPLATE"], [[CKA["CKA_LABEL"], 5]]]],
                      [[CKA["CKA_CLASS"], ulong(4)], [CKA["CKA_ID"], 1]]):
        err = unsafe_arguments(SHAPES[code], [code, 1, template_])
        assert err is not None
        assert planes.fast("C_FindObjectsInit", template_) == [err.rv]
    # nil and a zero length are (NULL, 0): the module gets them
    assert planes.both("C_FindObjectsInit", [[CKA["CKA_LABEL"], None], [CKA["CKA_ID"], 0]]) == [OK]
    assert planes.both("C_FindObjectsFinal") == [OK]


def test_generate_and_seed_random(planes: Planes) -> None:
    rv, one = planes.fast("C_GenerateRandom", 64)
    rv2, two = planes.fast("C_GenerateRandom", 64)
    assert rv == rv2 == OK and len(one) == len(two) == 64 and one != two and one != bytes(64)
    assert planes.both("C_GenerateRandom", 0) == [OK, b""]
    planes.both("C_GenerateRandom", None)
    planes.both("C_SeedRandom", b"some seed bytes")
    planes.both("C_SeedRandom", b"")
    planes.both("C_SeedRandom", None)


def _sample(arg: spec.Arg, key: int) -> Any:
    """A well-formed request element of each kind the data plane takes."""
    return {"object": key, "ulong": 0, "bytes": b"x", "mechanism": [CKM["CKM_SHA256"], None],
            "template": [], "template_get": [], "out_bytes": None, "out_random": 8,
            "out_objects": 4, "out_session_info": 0}[arg.kind]


def test_a_revoked_binding_refuses_every_function(planes: Planes) -> None:
    (other,) = planes.helper.ok(FAST_ALLOW, planes.b)
    assert planes.helper.call(FAST_REVOKE, other) == [OK]
    s = planes.connect()
    try:
        for fn in DIRECT:
            request = [fn.code, other, *(_sample(a, planes.aes) for a in fn.wire_args[1:])]
            body = msgpack.packb(request, use_bin_type=True)
            s.sendall(struct.pack(">I", len(body)) + body)
            size = struct.unpack(">I", recv_exact(s, 4))[0]
            assert msgpack.unpackb(recv_exact(s, size)) == [CKR["CKR_SESSION_HANDLE_INVALID"]], fn.name
    finally:
        s.close()


NESTED = [CKA["CKA_WRAP_TEMPLATE"], CKA["CKA_UNWRAP_TEMPLATE"], CKA["CKA_DERIVE_TEMPLATE"]]
PLAIN = [CKA["CKA_LABEL"], CKA["CKA_CLASS"], CKA["CKA_ALLOWED_MECHANISMS"], CKA["CKA_ID"]]


def _attributes(depth: int) -> st.SearchStrategy[list[Any]]:
    value = st.one_of(st.binary(max_size=8), st.none(), st.just(0), st.integers(1, 2**64 - 1))
    plain = st.tuples(st.sampled_from(PLAIN) | st.integers(0, 2**32), value).map(list)
    if depth >= 3:
        return st.lists(plain, max_size=4)
    nested = st.tuples(st.sampled_from(NESTED), st.none() | st.integers(0, 3)
                       | _attributes(depth + 1)).map(list)
    return st.lists(plain | nested, max_size=4)


MECHANISMS = st.tuples(st.sampled_from(sorted(spec.mechanisms())) | st.sampled_from(
    [CKM["CKM_SHA256"], CKM["CKM_AES_CBC_PAD"], CKM["CKM_ECDSA"]]),
    st.none() | st.binary(max_size=40)).map(list)


@pytest.fixture(scope="module")
def revoked(planes: Planes) -> int:
    """An id the helper revoked: the checks answer before the binding does, and
    nothing reaches the module."""
    (other,) = planes.helper.ok(FAST_ALLOW, planes.b)
    assert planes.helper.call(FAST_REVOKE, other) == [OK]
    return int(other)


def _ask(planes: Planes, request: list[Any]) -> list[Any] | None:
    """The answer to one request on a connection of its own; None: closed."""
    s = planes.connect()
    try:
        body = msgpack.packb(request, use_bin_type=True)
        s.sendall(struct.pack(">I", len(body)) + body)
        size = struct.unpack(">I", recv_exact(s, 4))[0]
        reply: list[Any] = msgpack.unpackb(recv_exact(s, size))
        return reply
    except ConnectionError:
        return None
    finally:
        s.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(template_=_attributes(0), mechanism=MECHANISMS,
       init=st.sampled_from([f.name for f in DIRECT if any(a.kind == "mechanism" for a in f.args)]))
def test_the_daemons_checks_and_the_direct_paths_agree(
        planes: Planes, revoked: int, template_: list[Any], mechanism: list[Any], init: str) -> None:
    """DESIGN, invariant 5: for any template and mechanism, the direct path refuses
    exactly what the daemon's shapes.unsafe_arguments refuses, with its code."""
    invalid = CKR["CKR_SESSION_HANDLE_INVALID"]
    find = CODE["C_FindObjectsInit"]
    err = unsafe_arguments(SHAPES[find], [find, 1, template_])
    assert _ask(planes, [find, revoked, template_]) == [err.rv if err else invalid]
    code = CODE[init]
    args = [mechanism] + ([7] if len(SHAPES[code].fn.wire_args) == 3 else [])
    err = unsafe_arguments(SHAPES[code], [code, 1, *args])
    assert _ask(planes, [code, revoked, *args]) == [err.rv if err else invalid]


def _malformed(fn: spec.Function, fast_id: int, key: int) -> Iterator[tuple[str, bytes]]:
    """Requests of the wrong shape for fn: one argument more or less, each argument of a
    type its kind never has, and lengths no frame holds."""
    args = [_sample(a, key) for a in fn.wire_args[1:]]

    def packed(items: list[Any]) -> bytes:
        return msgpack.packb([fn.code, fast_id, *items], use_bin_type=True)

    yield "one more", packed([*args, 0])
    yield "one fewer", packed(args[:-1]) if args else msgpack.packb([fn.code])
    for i, arg in enumerate(fn.wire_args[1:]):
        for what, wrong in (("str", "text"), ("bool", True), ("negative", -1), ("map", {1: 2}),
                            ("float", 1.5)):
            yield f"{arg.cnames[0]} {what}", packed([*args[:i], wrong, *args[i + 1:]])
        # a bin or an array that says it is longer than the frame
        head = packed([*args[:i], None, *args[i + 1:]])
        nil_at = len(head) - len(b"".join(msgpack.packb(a, use_bin_type=True) for a in args[i + 1:])) - 1
        assert head[nil_at] == 0xc0
        yield f"{arg.kind} huge bin", head[:nil_at] + b"\xc6\xff\xff\xff\xf0" + head[nil_at + 1:]
        yield f"{arg.kind} huge array", head[:nil_at] + b"\xdd\xff\xff\xff\xf0" + head[nil_at + 1:]


@pytest.mark.parametrize("fn", DIRECT, ids=[f.name for f in DIRECT])
def test_malformed_requests_close_the_connection(planes: Planes, fn: spec.Function) -> None:
    for why, body in _malformed(fn, planes.id, planes.aes):
        s = planes.connect()
        try:
            s.sendall(struct.pack(">I", len(body)) + body)
            assert closed(s), f"{fn.name}: {why}: not closed"
        finally:
            s.close()
    # the helper serves on: the other connection, new ones, and its pipe
    assert planes.fast("C_GenerateRandom", 4)[0] == OK
    s = planes.connect()
    s.close()
    assert planes.helper.call(PING)[0] == OK


def test_served_calls_are_counted(planes: Planes) -> None:
    rv, before = planes.helper.call(FAST_SERVED)
    planes.fast("C_GenerateRandom", 4)
    planes.fast("C_GetSessionInfo", 0)
    rv2, after = planes.helper.call(FAST_SERVED)
    assert rv == rv2 == OK and after == before + 2
