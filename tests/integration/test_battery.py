"""The integration battery: PyKCS11 as the application, each test run against SoftHSM2
directly and through p11p-client.so; results verified with an independent library."""

from __future__ import annotations

import os

import PyKCS11 as P
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from kit import Target


def _label(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def rsa_pair(s, label: str, bits: int = 2048):  # type: ignore[no-untyped-def]
    pub_t = [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_TOKEN, False), (P.CKA_MODULUS_BITS, bits),
             (P.CKA_PUBLIC_EXPONENT, (0x01, 0x00, 0x01)), (P.CKA_VERIFY, True),
             (P.CKA_ENCRYPT, True), (P.CKA_WRAP, True), (P.CKA_LABEL, label)]
    priv_t = [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_TOKEN, False), (P.CKA_PRIVATE, True),
              (P.CKA_SENSITIVE, True), (P.CKA_SIGN, True), (P.CKA_DECRYPT, True),
              (P.CKA_UNWRAP, True), (P.CKA_LABEL, label)]
    return s.generateKeyPair(pub_t, priv_t, mecha=P.MechanismRSAGENERATEKEYPAIR)


def rsa_public(s, pub) -> rsa.RSAPublicKey:  # type: ignore[no-untyped-def]
    n, e = s.getAttributeValue(pub, [P.CKA_MODULUS, P.CKA_PUBLIC_EXPONENT])
    return rsa.RSAPublicNumbers(int.from_bytes(bytes(e), "big"),
                                int.from_bytes(bytes(n), "big")).public_key()


P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")


def ec_pair(s, label: str, token: bool = False):  # type: ignore[no-untyped-def]
    pub_t = [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_TOKEN, token),
             (P.CKA_EC_PARAMS, P256_PARAMS), (P.CKA_VERIFY, True), (P.CKA_LABEL, label),
             (P.CKA_ID, label.encode())]
    priv_t = [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_TOKEN, token),
              (P.CKA_PRIVATE, True), (P.CKA_SENSITIVE, True), (P.CKA_SIGN, True),
              (P.CKA_DERIVE, True), (P.CKA_LABEL, label), (P.CKA_ID, label.encode())]
    return s.generateKeyPair(pub_t, priv_t, mecha=P.Mechanism(P.CKM_EC_KEY_PAIR_GEN))


def ec_public(s, pub) -> ec.EllipticCurvePublicKey:  # type: ignore[no-untyped-def]
    (point,) = s.getAttributeValue(pub, [P.CKA_EC_POINT])
    raw = bytes(point)
    assert raw[0] == 0x04 and raw[1] == 65  # DER OCTET STRING around the point
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw[2:])


def aes_key(s, label: str, extractable: bool = False, sensitive: bool = True):  # type: ignore[no-untyped-def]
    t = [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES), (P.CKA_VALUE_LEN, 32),
         (P.CKA_TOKEN, False), (P.CKA_ENCRYPT, True), (P.CKA_DECRYPT, True),
         (P.CKA_WRAP, True), (P.CKA_UNWRAP, True), (P.CKA_SENSITIVE, sensitive),
         (P.CKA_EXTRACTABLE, extractable), (P.CKA_LABEL, label)]
    return s.generateKey(t, mecha=P.Mechanism(P.CKM_AES_KEY_GEN))


def test_token_and_mechanisms_match(target: Target, pykcs11_direct) -> None:  # type: ignore[no-untyped-def]
    info = target.lib.getTokenInfo(target.slot)
    assert info.label.strip() == ("tokA" if target.name == "direct" else "signing")
    assert info.flags & P.CKF_TOKEN_INITIALIZED
    direct_slot = next(s for s in pykcs11_direct.getSlotList(tokenPresent=True)
                       if pykcs11_direct.getTokenInfo(s).label.strip() == "tokA")
    assert target.lib.getMechanismList(target.slot) == pykcs11_direct.getMechanismList(direct_slot)
    mi = target.lib.getMechanismInfo(target.slot, "CKM_ECDSA")
    md = pykcs11_direct.getMechanismInfo(direct_slot, "CKM_ECDSA")
    assert (mi.ulMinKeySize, mi.ulMaxKeySize, mi.flags) == (md.ulMinKeySize, md.ulMaxKeySize, md.flags)


def test_rsa_pkcs1_and_pss_sign_verify(target: Target) -> None:
    s = target.session()
    pub, priv = rsa_pair(s, _label("rsa"))
    key = rsa_public(s, pub)
    data = b"p11p signs this"
    sig = bytes(s.sign(priv, data, P.Mechanism(P.CKM_SHA256_RSA_PKCS)))
    key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    pss = P.RSA_PSS_Mechanism(P.CKM_SHA256_RSA_PKCS_PSS, P.CKM_SHA256, P.CKG_MGF1_SHA256, 32)
    sig = bytes(s.sign(priv, data, pss))
    key.verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    assert s.verify(pub, data, sig, pss)
    s.closeSession()


def test_ecdsa_sign_verify(target: Target) -> None:
    s = target.session()
    pub, priv = ec_pair(s, _label("ec"))
    data = b"x" * 100
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    sig = bytes(s.sign(priv, digest.finalize(), P.Mechanism(P.CKM_ECDSA)))
    r, ss = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    ec_public(s, pub).verify(encode_dss_signature(r, ss), data, ec.ECDSA(hashes.SHA256()))
    s.closeSession()


def test_rsa_oaep_round_trip(target: Target) -> None:
    s = target.session()
    pub, priv = rsa_pair(s, _label("oaep"))
    key = rsa_public(s, pub)
    # SoftHSM2 2.6 implements OAEP with SHA-1 only
    oaep = P.RSAOAEPMechanism(P.CKM_SHA_1, P.CKG_MGF1_SHA1)
    ct = key.encrypt(b"secret", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    assert bytes(s.decrypt(priv, ct, oaep)) == b"secret"
    ct2 = bytes(s.encrypt(pub, b"other secret", oaep))
    assert bytes(s.decrypt(priv, ct2, oaep)) == b"other secret"
    s.closeSession()


def test_aes_gcm_and_cbc_pad(target: Target) -> None:
    s = target.session()
    key = aes_key(s, _label("aes"))
    iv = os.urandom(12)
    gcm = P.AES_GCM_Mechanism(iv, b"header", 128)
    plain = os.urandom(1000)
    ct = bytes(s.encrypt(key, plain, gcm))
    assert len(ct) == len(plain) + 16
    assert bytes(s.decrypt(key, ct, P.AES_GCM_Mechanism(iv, b"header", 128))) == plain
    cbc = P.Mechanism(P.CKM_AES_CBC_PAD, os.urandom(16))
    ct = bytes(s.encrypt(key, plain, cbc))
    assert len(ct) == 1008
    assert bytes(s.decrypt(key, ct, cbc)) == plain
    s.closeSession()


def test_multipart_digest_sign_encrypt(target: Target) -> None:
    import ctypes as C

    from ckraw import CK_ULONG, Module, mechanism
    s = target.session()
    parts = [os.urandom(n) for n in (1, 100, 1000, 17)]
    d = s.digestSession(P.Mechanism(P.CKM_SHA256))
    for p in parts:
        d.update(p)
    h = hashes.Hash(hashes.SHA256())
    for p in parts:
        h.update(p)
    assert bytes(d.final()) == h.finalize()
    pub, priv = rsa_pair(s, _label("mp"))
    key = aes_key(s, _label("mpaes"))
    # multi-part sign and encrypt with explicit calls, in the same application
    m = Module(target.module)
    m.initialize()  # already initialised by PyKCS11 in this process: answers so
    raw = m.open_session(target.slot)
    out = (C.c_ubyte * 2048)()
    n = CK_ULONG()
    mech, _ = mechanism(P.CKM_SHA256_RSA_PKCS)
    assert m.C_SignInit(raw, C.byref(mech), priv.value()) == 0
    for p in parts:
        assert m.C_SignUpdate(raw, p, len(p)) == 0
    n.value = 2048
    assert m.C_SignFinal(raw, out, C.byref(n)) == 0
    rsa_public(s, pub).verify(bytes(out[: n.value]), b"".join(parts), padding.PKCS1v15(),
                              hashes.SHA256())
    iv = os.urandom(16)
    mech, keep = mechanism(P.CKM_AES_CBC_PAD, iv)
    assert m.C_EncryptInit(raw, C.byref(mech), key.value()) == 0
    ct = b""
    for p in parts:
        n.value = 2048
        assert m.C_EncryptUpdate(raw, p, len(p), out, C.byref(n)) == 0
        ct += bytes(out[: n.value])
    n.value = 2048
    assert m.C_EncryptFinal(raw, out, C.byref(n)) == 0
    ct += bytes(out[: n.value])
    assert m.C_CloseSession(raw) == 0
    assert bytes(s.decrypt(key, ct, P.Mechanism(P.CKM_AES_CBC_PAD, iv))) == b"".join(parts)
    s.closeSession()


def test_wrap_unwrap(target: Target) -> None:
    s = target.session()
    kek = aes_key(s, _label("kek"))
    inner = aes_key(s, _label("inner"), extractable=True)
    wrapped = bytes(s.wrapKey(kek, inner, P.Mechanism(P.CKM_AES_KEY_WRAP_PAD)))
    assert len(wrapped) == 40
    t = [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES), (P.CKA_TOKEN, False),
         (P.CKA_ENCRYPT, True), (P.CKA_DECRYPT, True)]
    back = s.unwrapKey(kek, wrapped, t, P.Mechanism(P.CKM_AES_KEY_WRAP_PAD))
    iv = os.urandom(16)
    m = P.Mechanism(P.CKM_AES_CBC_PAD, iv)
    assert bytes(s.decrypt(back, bytes(s.encrypt(inner, b"same key", m)), m)) == b"same key"
    s.closeSession()


def test_ecdh_derive_agrees(target: Target) -> None:
    s = target.session()
    pub, priv = ec_pair(s, _label("ecdh"))
    peer = ec.generate_private_key(ec.SECP256R1())
    peer_point = peer.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    t = [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_GENERIC_SECRET),
         (P.CKA_TOKEN, False), (P.CKA_SENSITIVE, False), (P.CKA_EXTRACTABLE, True),
         (P.CKA_VALUE_LEN, 32)]
    derived = s.deriveKey(priv, t, P.ECDH1_DERIVE_Mechanism(peer_point))
    (value,) = s.getAttributeValue(derived, [P.CKA_VALUE])
    assert bytes(value) == peer.exchange(ec.ECDH(), ec_public(s, pub))
    s.closeSession()


def test_random(target: Target) -> None:
    s = target.session(login=False)
    a, b = bytes(s.generateRandom(32)), bytes(s.generateRandom(32))
    assert len(a) == 32 and a != b
    s.closeSession()


def test_find_objects_and_attributes(target: Target) -> None:
    s = target.session()
    label = _label("find")
    pub, priv = ec_pair(s, label)
    aes = aes_key(s, label)
    found = s.findObjects([(P.CKA_LABEL, label)])
    assert sorted(o.value() for o in found) == sorted(o.value() for o in [pub, priv, aes])
    only_priv = s.findObjects([(P.CKA_LABEL, label), (P.CKA_CLASS, P.CKO_PRIVATE_KEY)])
    assert [o.value() for o in only_priv] == [priv.value()]
    assert s.findObjects([(P.CKA_LABEL, "no such label " + label)]) == []
    # the sensitive value is not readable; other attributes are
    (cls,) = s.getAttributeValue(aes, [P.CKA_CLASS])
    assert cls == P.CKO_SECRET_KEY
    value = s.getAttributeValue(aes, [P.CKA_VALUE, P.CKA_LABEL], allAsBinary=True)
    assert value[0] is None and bytes(value[1]) == label.encode()
    s.closeSession()


def test_many_objects_found(target: Target) -> None:
    s = target.session()
    label = _label("batch")
    keys = [aes_key(s, label) for _ in range(23)]
    got = s.findObjects([(P.CKA_LABEL, label)])  # PyKCS11 fetches in batches of 10
    assert sorted(o.value() for o in got) == sorted(o.value() for o in keys)
    s.closeSession()


def test_session_info_and_login_state(target: Target) -> None:
    s = target.session(login=False)
    info = s.getSessionInfo()
    assert info.slotID == target.slot
    s.login("1234")
    assert s.getSessionInfo().state == P.CKS_RW_USER_FUNCTIONS
    with pytest.raises(P.PyKCS11Error) as err:
        s.login("1234")
    assert err.value.value == P.CKR_USER_ALREADY_LOGGED_IN
    s.logout()
    assert s.getSessionInfo().state == P.CKS_RW_PUBLIC_SESSION
    s.closeSession()


def test_wrong_pin_is_reported(target: Target) -> None:
    s = target.session(login=False)
    with pytest.raises(P.PyKCS11Error) as err:
        s.login("0000")
    assert err.value.value == P.CKR_PIN_INCORRECT
    s.closeSession()
