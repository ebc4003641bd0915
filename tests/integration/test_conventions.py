"""Cryptoki calling conventions, exactly as a C application makes the calls (ctypes):
length queries, too-small and zero-length buffers, NULL pointers, per-attribute results,
nested templates, zeroed output structures. Each case runs against SoftHSM2 directly and
through p11p, and the two must give the same results."""

from __future__ import annotations

import ctypes as C
import os
import threading

import pytest
from ckraw import (
    CK_ATTRIBUTE,
    CK_MECHANISM_INFO,
    CK_ULONG,
    CKA,
    CKF,
    CKM,
    CKR,
    Module,
    mechanism,
    template,
)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from kit import CLIENT_SO, SOFTHSM_SO, USER_PIN

UNAVAILABLE = 2**64 - 1


@pytest.fixture(scope="module")
def modules(daemon, softhsm):  # type: ignore[no-untyped-def]
    out = {}
    for name, path, label in (("direct", SOFTHSM_SO, b"tokA"), ("p11p", CLIENT_SO, b"signing")):
        m = Module(path)
        assert m.initialize() in (CKR["CKR_OK"], CKR["CKR_CRYPTOKI_ALREADY_INITIALIZED"])
        slot = None
        for s in m.slots():
            info = (C.c_ubyte * 512)()
            assert m.C_GetTokenInfo(s, info) == 0
            if bytes(info[:32]).rstrip() == label:
                slot = s
        assert slot is not None
        out[name] = (m, slot)
    return out


def _session(m: Module, slot: int) -> int:
    h = m.open_session(slot)
    assert m.login(h, USER_PIN.encode()) in (0, CKR["CKR_USER_ALREADY_LOGGED_IN"])
    return h


def _aes_key(m: Module, h: int) -> int:
    arr, n, keep = template((CKA["CKA_CLASS"], 4), (CKA["CKA_KEY_TYPE"], 0x1f),
                            (CKA["CKA_VALUE_LEN"], 16), (CKA["CKA_TOKEN"], False),
                            (CKA["CKA_ENCRYPT"], True), (CKA["CKA_DECRYPT"], True),
                            (CKA["CKA_SENSITIVE"], True))
    mech, _ = mechanism(CKM["CKM_AES_KEY_GEN"])
    key = CK_ULONG()
    assert m.C_GenerateKey(h, C.byref(mech), arr, n, C.byref(key)) == 0
    return key.value


def _each(modules, fn):  # type: ignore[no-untyped-def]
    return {name: fn(m, slot) for name, (m, slot) in modules.items()}


def test_length_query_too_small_and_exact(modules) -> None:  # type: ignore[no-untyped-def]
    def run(m: Module, slot: int):  # type: ignore[no-untyped-def]
        h = _session(m, slot)
        key = _aes_key(m, h)
        mech, keep = mechanism(CKM["CKM_AES_CBC_PAD"], b"\0" * 16)
        assert m.C_EncryptInit(h, C.byref(mech), key) == 0
        data = b"a" * 33
        n = CK_ULONG(0)
        rv_query = m.C_Encrypt(h, data, len(data), None, C.byref(n))
        needed = n.value
        small = (C.c_ubyte * 4)()
        n.value = 4
        rv_small = m.C_Encrypt(h, data, len(data), small, C.byref(n))
        after_small = n.value
        out = (C.c_ubyte * 64)()
        n.value = 64
        rv_ok = m.C_Encrypt(h, data, len(data), out, C.byref(n))
        # the operation has ended: a further call says so
        rv_after = m.C_Encrypt(h, data, len(data), out, C.byref(n))
        m.C_CloseSession(h)
        return rv_query, needed, rv_small, after_small, rv_ok, rv_after

    results = _each(modules, run)
    assert results["direct"] == results["p11p"]
    assert results["p11p"][:5] == (0, 48, CKR["CKR_BUFFER_TOO_SMALL"], 48, 0)
    assert results["p11p"][5] == CKR["CKR_OPERATION_NOT_INITIALIZED"]


def test_zero_length_buffer_is_not_a_length_query(modules) -> None:  # type: ignore[no-untyped-def]
    def run(m: Module, slot: int):  # type: ignore[no-untyped-def]
        h = _session(m, slot)
        key = _aes_key(m, h)
        mech, keep = mechanism(CKM["CKM_AES_CBC_PAD"], b"\0" * 16)
        assert m.C_EncryptInit(h, C.byref(mech), key) == 0
        out = (C.c_ubyte * 64)()
        n = CK_ULONG(64)
        assert m.C_EncryptUpdate(h, b"x" * 20, 20, out, C.byref(n)) == 0
        zero = (C.c_ubyte * 1)()
        n.value = 0
        rv = m.C_EncryptFinal(h, zero, C.byref(n))
        got = n.value
        # whatever the module decided, a length query would have left the operation open
        n.value = 64
        rv_next = m.C_EncryptFinal(h, out, C.byref(n))
        m.C_CloseSession(h)
        return rv, got, rv_next

    results = _each(modules, run)
    assert results["direct"] == results["p11p"]
    assert results["p11p"][0] == CKR["CKR_BUFFER_TOO_SMALL"]


def test_null_output_handle_pointer(modules) -> None:  # type: ignore[no-untyped-def]
    results = _each(modules, lambda m, slot: m.C_OpenSession(slot, CKF["CKF_SERIAL_SESSION"], None, None, None))
    assert results == {"direct": CKR["CKR_ARGUMENTS_BAD"], "p11p": CKR["CKR_ARGUMENTS_BAD"]}


def test_generate_random_zero_and_null(modules) -> None:  # type: ignore[no-untyped-def]
    def run(m: Module, slot: int):  # type: ignore[no-untyped-def]
        h = m.open_session(slot)
        buf = (C.c_ubyte * 1)(0x5A)
        rv0 = m.C_GenerateRandom(h, buf, 0)
        untouched = buf[0]
        big = (C.c_ubyte * 64)()
        rv64 = m.C_GenerateRandom(h, big, 64)
        m.C_CloseSession(h)
        return rv0, untouched, rv64, bytes(big) != b"\0" * 64

    results = _each(modules, run)
    assert results["direct"] == results["p11p"]
    assert results["p11p"][2:] == (0, True)


def test_output_structures_are_zeroed(modules) -> None:  # type: ignore[no-untyped-def]
    def run(m: Module, slot: int, fill: int):  # type: ignore[no-untyped-def]
        info = CK_MECHANISM_INFO()
        C.memset(C.byref(info), fill, C.sizeof(info))
        assert m.C_GetMechanismInfo(slot, CKM["CKM_ECDSA"], C.byref(info)) == 0
        return info.ulMinKeySize, info.ulMaxKeySize, info.flags

    direct = run(*modules["direct"], 0)
    assert run(*modules["p11p"], 0xFF) == direct  # garbage in the caller's struct changes nothing


def test_get_attribute_value_mixed_results(modules) -> None:  # type: ignore[no-untyped-def]
    def run(m: Module, slot: int):  # type: ignore[no-untyped-def]
        h = _session(m, slot)
        key = _aes_key(m, h)
        attrs = (CK_ATTRIBUTE * 4)()
        bufs = [(C.c_ubyte * 64)() for _ in range(4)]
        types = [CKA["CKA_CLASS"], CKA["CKA_VALUE"], 0x7FFFFF01, CKA["CKA_VALUE_LEN"]]
        for i, t in enumerate(types):
            attrs[i].type = t
            attrs[i].pValue = C.cast(bufs[i], C.c_void_p)
            attrs[i].ulValueLen = 64 if i != 3 else 2  # too small for a CK_ULONG
        rv = m.C_GetAttributeValue(h, key, attrs, 4)
        lens = [a.ulValueLen for a in attrs]
        cls = bytes(bufs[0][:8])
        # length query on all of them
        for a in attrs:
            a.pValue = None
        rv_q = m.C_GetAttributeValue(h, key, attrs, 4)
        lens_q = [a.ulValueLen for a in attrs]
        m.C_CloseSession(h)
        return rv, lens, cls, rv_q, lens_q

    results = _each(modules, run)
    assert results["direct"] == results["p11p"]
    rv, lens, cls, rv_q, lens_q = results["p11p"]
    assert lens[0] == 8 and cls == (4).to_bytes(8, "little")
    assert lens[1] == UNAVAILABLE and lens[2] == UNAVAILABLE and lens[3] == UNAVAILABLE
    assert rv in (CKR["CKR_ATTRIBUTE_SENSITIVE"], CKR["CKR_ATTRIBUTE_TYPE_INVALID"],
                  CKR["CKR_BUFFER_TOO_SMALL"])
    assert lens_q[0] == 8 and lens_q[3] == 8


def test_nested_wrap_template(modules) -> None:  # type: ignore[no-untyped-def]
    def run(m: Module, slot: int):  # type: ignore[no-untyped-def]
        h = _session(m, slot)
        inner, n_inner, keep1 = template((CKA["CKA_CLASS"], 4), (CKA["CKA_KEY_TYPE"], 0x1f))
        arr, n, keep2 = template((CKA["CKA_CLASS"], 4), (CKA["CKA_KEY_TYPE"], 0x1f),
                                 (CKA["CKA_VALUE_LEN"], 16), (CKA["CKA_TOKEN"], False),
                                 (CKA["CKA_WRAP"], True))
        arr2 = (CK_ATTRIBUTE * (n + 1))()
        for i in range(n):
            arr2[i] = arr[i]
        arr2[n].type = CKA["CKA_WRAP_TEMPLATE"]
        arr2[n].pValue = C.cast(inner, C.c_void_p)
        arr2[n].ulValueLen = C.sizeof(CK_ATTRIBUTE) * n_inner
        mech, _ = mechanism(CKM["CKM_AES_KEY_GEN"])
        key = CK_ULONG()
        assert m.C_GenerateKey(h, C.byref(mech), arr2, n + 1, C.byref(key)) == 0
        q = (CK_ATTRIBUTE * 1)()
        q[0].type = CKA["CKA_WRAP_TEMPLATE"]
        rv1 = m.C_GetAttributeValue(h, key.value, q, 1)
        count = q[0].ulValueLen // C.sizeof(CK_ATTRIBUTE)
        got = (CK_ATTRIBUTE * count)()
        q[0].pValue = C.cast(got, C.c_void_p)
        rv2 = m.C_GetAttributeValue(h, key.value, q, 1)  # inner lengths
        bufs = [(C.c_ubyte * got[i].ulValueLen)() for i in range(count)]
        for i in range(count):
            got[i].pValue = C.cast(bufs[i], C.c_void_p)
        rv3 = m.C_GetAttributeValue(h, key.value, q, 1)
        values = sorted((got[i].type, bytes(bufs[i])) for i in range(count))
        m.C_CloseSession(h)
        return rv1, count, rv2, rv3, values

    results = _each(modules, run)
    assert results["direct"] == results["p11p"]
    assert results["p11p"][1] == 2
    assert results["p11p"][4] == sorted([(CKA["CKA_CLASS"], (4).to_bytes(8, "little")),
                                         (CKA["CKA_KEY_TYPE"], (0x1f).to_bytes(8, "little"))])


def test_sixteen_threads_two_hundred_signatures_each(modules) -> None:  # type: ignore[no-untyped-def]
    m, slot = modules["p11p"]
    h = _session(m, slot)
    p256 = bytes.fromhex("06082a8648ce3d030107")
    pub_t, n_pub, k1 = template((CKA["CKA_EC_PARAMS"], p256), (CKA["CKA_TOKEN"], False),
                                (CKA["CKA_VERIFY"], True))
    priv_t, n_priv, k2 = template((CKA["CKA_TOKEN"], False), (CKA["CKA_SIGN"], True),
                                  (CKA["CKA_PRIVATE"], True), (CKA["CKA_SENSITIVE"], True))
    mech, _ = mechanism(CKM["CKM_EC_KEY_PAIR_GEN"])
    pub, priv = CK_ULONG(), CK_ULONG()
    assert m.C_GenerateKeyPair(h, C.byref(mech), pub_t, n_pub, priv_t, n_priv, C.byref(pub), C.byref(priv)) == 0
    q = (CK_ATTRIBUTE * 1)()
    point = (C.c_ubyte * 67)()
    q[0].type, q[0].pValue, q[0].ulValueLen = CKA["CKA_EC_POINT"], C.cast(point, C.c_void_p), 67
    assert m.C_GetAttributeValue(h, pub.value, q, 1) == 0
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(point)[2:])
    results: list[tuple[bytes, bytes]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        hs = m.open_session(slot)
        sign_mech, _ = mechanism(CKM["CKM_ECDSA"])
        sig = (C.c_ubyte * 64)()
        mine = []
        for i in range(200):
            digest = os.urandom(32)
            if m.C_SignInit(hs, C.byref(sign_mech), priv.value) != 0:
                errors.append(f"thread {n} SignInit {i}")
                return
            ln = CK_ULONG(64)
            rv = m.C_Sign(hs, digest, 32, sig, C.byref(ln))
            if rv != 0 or ln.value != 64:
                errors.append(f"thread {n} Sign {i}: {rv:#x}")
                return
            mine.append((digest, bytes(sig)))
        m.C_CloseSession(hs)
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    m.C_CloseSession(h)
    assert not errors
    assert len(results) == 16 * 200
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    for digest, sig in results:
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
