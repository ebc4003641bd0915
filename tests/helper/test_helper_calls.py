"""Cryptoki calls through the helper against a real SoftHSM2 token, with real results:
slots and token information, mechanisms (compared with PyKCS11 on the same module),
key generation with templates, signatures and ciphertexts checked with `cryptography`,
structured mechanism parameters, output-length conventions, attribute reads, nested
templates, wrapping and key derivation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from helperfixtures import *  # noqa: F403  (the fixtures)
from helperlink import (
    FALSE,
    SOFTHSM_SO,
    TOKEN_LABEL,
    TRUE,
    UNAVAILABLE,
    HelperLink,
    SoftHSMDir,
    attr_ulong,
    template,
    ulong,
)
from p11p.protocol.constants import CKA, CKF, CKK, CKM, CKO, CKR

OK = CKR["CKR_OK"]
P256 = bytes.fromhex("06082a8648ce3d030107")  # DER OID of secp256r1
CKG_MGF1_SHA1 = 1
CKG_MGF1_SHA256 = 2
CKZ_DATA_SPECIFIED = 1
CKD_NULL = 1

# function codes (protocol/functions.spec)
GET_SLOT_LIST, GET_SLOT_INFO, GET_TOKEN_INFO, GET_MECH_LIST, GET_MECH_INFO = 5, 6, 7, 8, 9
OPEN_SESSION, GET_SESSION_INFO, CREATE_OBJECT, GET_ATTRIBUTE_VALUE = 13, 16, 21, 25
FIND_INIT, FIND, FIND_FINAL = 27, 28, 29
ENCRYPT_INIT, ENCRYPT, ENCRYPT_UPDATE, ENCRYPT_FINAL = 30, 31, 32, 33
DECRYPT_INIT, DECRYPT, DECRYPT_UPDATE, DECRYPT_FINAL = 34, 35, 36, 37
SIGN_INIT, SIGN = 43, 44
GENERATE_KEY, GENERATE_KEY_PAIR, WRAP_KEY, UNWRAP_KEY, DERIVE_KEY = 59, 60, 61, 62, 63
GENERATE_RANDOM = 65


# -- keys -----------------------------------------------------------------------------

def aes_key(helper: HelperLink, session: int, readable: bool = True, **extra: bytes) -> int:
    attrs = template(TOKEN=FALSE, VALUE_LEN=ulong(32), ENCRYPT=TRUE, DECRYPT=TRUE,
                     SENSITIVE=FALSE if readable else TRUE, EXTRACTABLE=TRUE, **extra)
    return int(helper.ok(GENERATE_KEY, session, [CKM["CKM_AES_KEY_GEN"], None], attrs, 0)[0])


def ec_pair(helper: HelperLink, session: int) -> tuple[int, int]:
    public = template(TOKEN=FALSE, EC_PARAMS=P256, VERIFY=TRUE)
    private = template(TOKEN=FALSE, PRIVATE=TRUE, SENSITIVE=TRUE, SIGN=TRUE, DERIVE=TRUE)
    pub, priv = helper.ok(GENERATE_KEY_PAIR, session, [CKM["CKM_EC_KEY_PAIR_GEN"], None],
                          public, private, 0, 0)
    return int(pub), int(priv)


def ec_point(helper: HelperLink, session: int, pub: int) -> bytes:
    """The raw uncompressed point of CKA_EC_POINT (a DER OCTET STRING)."""
    der = helper.get_attributes(session, pub, [CKA["CKA_EC_POINT"]])[CKA["CKA_EC_POINT"]]
    assert der[0] == 0x04 and der[1] == len(der) - 2
    return der[2:]


def value_of(helper: HelperLink, session: int, key: int) -> bytes:
    return helper.get_attributes(session, key, [CKA["CKA_VALUE"]])[CKA["CKA_VALUE"]]


@pytest.fixture(scope="module")
def ec_key(helper: HelperLink, session: int) -> tuple[int, int, ec.EllipticCurvePublicKey]:
    pub, priv = ec_pair(helper, session)
    point = ec_point(helper, session, pub)
    return pub, priv, ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


@pytest.fixture(scope="module")
def rsa_key(helper: HelperLink, session: int) -> tuple[int, int, rsa.RSAPublicKey]:
    public = template(TOKEN=FALSE, VERIFY=TRUE, ENCRYPT=TRUE, MODULUS_BITS=ulong(2048),
                      PUBLIC_EXPONENT=b"\x01\x00\x01")
    private = template(TOKEN=FALSE, PRIVATE=TRUE, SENSITIVE=TRUE, SIGN=TRUE, DECRYPT=TRUE)
    pub, priv = helper.ok(GENERATE_KEY_PAIR, session,
                          [CKM["CKM_RSA_PKCS_KEY_PAIR_GEN"], None], public, private, 0, 0)
    values = helper.get_attributes(session, pub, [CKA["CKA_MODULUS"], CKA["CKA_PUBLIC_EXPONENT"]])
    numbers = rsa.RSAPublicNumbers(int.from_bytes(values[CKA["CKA_PUBLIC_EXPONENT"]], "big"),
                                   int.from_bytes(values[CKA["CKA_MODULUS"]], "big"))
    return int(pub), int(priv), numbers.public_key()


# -- slots, token, mechanisms ---------------------------------------------------------

def test_slot_list_query_then_fill(helper: HelperLink, slot: int) -> None:
    rv, count = helper.call(GET_SLOT_LIST, 1, None)
    assert rv == OK and count >= 1
    rv, slots = helper.call(GET_SLOT_LIST, 0, None)
    assert rv == OK and slots >= count  # all slots: the free one too
    rv, listed = helper.call(GET_SLOT_LIST, 1, count)
    assert rv == OK and len(listed) == count and slot in listed
    assert helper.call(GET_SLOT_LIST, 0, 0) == [CKR["CKR_BUFFER_TOO_SMALL"], slots]


def test_slot_info(helper: HelperLink, slot: int) -> None:
    description, manufacturer, flags, hw, fw = helper.ok(GET_SLOT_INFO, slot, 0)[0]
    assert len(description) == 64 and manufacturer.startswith(b"SoftHSM")
    assert flags & CKF["CKF_TOKEN_PRESENT"] and len(hw) == 2 and len(fw) == 2


def test_token_info_fields(helper: HelperLink, slot: int) -> None:
    info = helper.ok(GET_TOKEN_INFO, slot, 0)[0]
    assert len(info) == 18
    label, manufacturer, model, serial, flags = info[:5]
    assert label == TOKEN_LABEL.encode().ljust(32) and manufacturer.startswith(b"SoftHSM")
    assert model.startswith(b"SoftHSM") and len(model) == 16 and len(serial) == 16
    assert flags & CKF["CKF_TOKEN_INITIALIZED"] and flags & CKF["CKF_LOGIN_REQUIRED"]
    assert flags & CKF["CKF_USER_PIN_INITIALIZED"]
    max_pin, min_pin = info[9], info[10]
    assert min_pin == 4 and max_pin == 255
    assert all(type(v) is int for v in info[4:15])
    assert len(info[15]) == 2 and len(info[16]) == 2 and len(info[17]) == 16


def test_token_info_of_a_bad_slot(helper: HelperLink) -> None:
    assert helper.call(GET_TOKEN_INFO, 2**31 + 12345, 0) == [CKR["CKR_SLOT_ID_INVALID"], None]


# PyKCS11's getMechanismList() adds a mechanism 0x1D of its own (PyKCS11 1.5.x), so the
# module's list is read through PyKCS11's low-level C_GetMechanismList.
PYKCS11_MECHANISMS = """
import json, sys, PyKCS11
from PyKCS11.LowLevel import CK_MECHANISM_INFO, ckulonglist
lib = PyKCS11.PyKCS11Lib()
lib.load(sys.argv[1])
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == sys.argv[2])
numbers = ckulonglist()
assert lib.lib.C_GetMechanismList(slot, numbers) == PyKCS11.CKR_OK
out = {}
for number in numbers:
    i = CK_MECHANISM_INFO()
    assert lib.lib.C_GetMechanismInfo(slot, number, i) == PyKCS11.CKR_OK
    out[number] = [i.ulMinKeySize, i.ulMaxKeySize, i.flags]
print(json.dumps({"slot": slot, "mechanisms": out}))
"""


def test_mechanisms_equal_the_modules(helper: HelperLink, hsm: SoftHSMDir, slot: int) -> None:
    rv, count = helper.call(GET_MECH_LIST, slot, None)
    assert rv == OK and count > 20
    rv, mechanisms = helper.call(GET_MECH_LIST, slot, count)
    assert rv == OK and len(mechanisms) == count
    assert helper.call(GET_MECH_LIST, slot, 1) == [CKR["CKR_BUFFER_TOO_SMALL"], count]
    direct = json.loads(subprocess.run(
        [sys.executable, "-c", PYKCS11_MECHANISMS, SOFTHSM_SO, TOKEN_LABEL], env=hsm.env,
        check=True, capture_output=True, text=True).stdout)
    assert direct["slot"] == slot
    expected = {int(k): v for k, v in direct["mechanisms"].items()}
    assert sorted(mechanisms) == sorted(expected)
    assert CKM["CKM_AES_GCM"] in mechanisms  # no mechanism is dropped on the way
    for mechanism in mechanisms:  # the structure was zeroed: no garbage in any field
        assert helper.ok(GET_MECH_INFO, slot, mechanism, 0)[0] == expected[mechanism]


def test_mechanism_info_flags(helper: HelperLink, slot: int) -> None:
    low, high, flags = helper.ok(GET_MECH_INFO, slot, CKM["CKM_AES_GCM"], 0)[0]
    assert (low, high) == (16, 32)
    assert flags == CKF["CKF_ENCRYPT"] | CKF["CKF_DECRYPT"]
    assert helper.call(GET_MECH_INFO, slot, 0x7FFFFFF0, 0) == [CKR["CKR_MECHANISM_INVALID"], None]


# -- sessions -------------------------------------------------------------------------

def test_session_info(helper: HelperLink, slot: int, session: int) -> None:
    slot_id, state, flags, device_error = helper.ok(GET_SESSION_INFO, session, 0)[0]
    assert slot_id == slot and state == 3  # CKS_RW_USER_FUNCTIONS
    assert flags == CKF["CKF_SERIAL_SESSION"] | CKF["CKF_RW_SESSION"] and device_error == 0


def test_null_session_pointer_reaches_the_module(helper: HelperLink, slot: int) -> None:
    flags = CKF["CKF_SERIAL_SESSION"]
    assert helper.call(OPEN_SESSION, slot, flags, None) == [CKR["CKR_ARGUMENTS_BAD"], None]


def test_generate_random(helper: HelperLink, session: int) -> None:
    assert helper.call(GENERATE_RANDOM, session, 0) == [OK, b""]
    rv, first = helper.call(GENERATE_RANDOM, session, 32)
    rv2, second = helper.call(GENERATE_RANDOM, session, 32)
    assert rv == rv2 == OK and len(first) == len(second) == 32 and first != second


def test_create_and_find_objects(helper: HelperLink, session: int) -> None:
    label = b"helper-find-me"
    data = template(CLASS=ulong(CKO["CKO_DATA"]), TOKEN=FALSE, LABEL=label, VALUE=b"payload")
    obj = helper.ok(CREATE_OBJECT, session, data, 0)[0]
    helper.ok(FIND_INIT, session, template(LABEL=label))
    assert helper.ok(FIND, session, 10) == [[obj]]
    assert helper.ok(FIND, session, 10) == [[]]
    helper.ok(FIND_FINAL, session)
    assert helper.get_attributes(session, obj, [CKA["CKA_VALUE"]]) == {CKA["CKA_VALUE"]: b"payload"}


# -- signatures -----------------------------------------------------------------------

def test_ecdsa_signature_verifies(helper: HelperLink, session: int,
                                  ec_key: tuple[int, int, ec.EllipticCurvePublicKey]) -> None:
    _, priv, public = ec_key
    digest = sha256(b"signed through the helper").digest()
    helper.ok(SIGN_INIT, session, [CKM["CKM_ECDSA"], None], priv)
    signature = helper.ok(SIGN, session, digest, 64)[0]
    assert len(signature) == 64
    der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                     int.from_bytes(signature[32:], "big"))
    public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_length_query_and_buffer_too_small(helper: HelperLink, session: int,
                                           ec_key: tuple[int, int, ec.EllipticCurvePublicKey]) -> None:
    _, priv, public = ec_key
    digest = sha256(b"lengths").digest()
    helper.ok(SIGN_INIT, session, [CKM["CKM_ECDSA"], None], priv)
    assert helper.call(SIGN, session, digest, None) == [OK, 64]  # query: NULL buffer
    assert helper.call(SIGN, session, digest, 10) == [CKR["CKR_BUFFER_TOO_SMALL"], 64]
    rv, signature = helper.call(SIGN, session, digest, 64)  # the operation went on
    assert rv == OK and len(signature) == 64
    der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                     int.from_bytes(signature[32:], "big"))
    public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_rsa_pss_signature_verifies(helper: HelperLink, session: int,
                                    rsa_key: tuple[int, int, rsa.RSAPublicKey]) -> None:
    _, priv, public = rsa_key
    data = b"PSS through a structured parameter"
    mechanism = [CKM["CKM_SHA256_RSA_PKCS_PSS"], [CKM["CKM_SHA256"], CKG_MGF1_SHA256, 32]]
    helper.ok(SIGN_INIT, session, mechanism, priv)
    signature = helper.ok(SIGN, session, data, 256)[0]
    public.verify(signature, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())


def test_rsa_oaep_round_trip(helper: HelperLink, session: int,
                             rsa_key: tuple[int, int, rsa.RSAPublicKey]) -> None:
    pub, priv, public = rsa_key
    # SoftHSM2 does OAEP with SHA-1 only (it answers CKR_ARGUMENTS_BAD to SHA-256)
    oaep = [CKM["CKM_RSA_PKCS_OAEP"], [CKM["CKM_SHA_1"], CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, None]]
    message = b"OAEP through a structured parameter"
    helper.ok(ENCRYPT_INIT, session, oaep, pub)
    ciphertext = helper.ok(ENCRYPT, session, message, 256)[0]
    helper.ok(DECRYPT_INIT, session, oaep, priv)
    assert helper.ok(DECRYPT, session, ciphertext, 256) == [message]
    # and a ciphertext made by `cryptography` decrypts in the token
    theirs = public.encrypt(message, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    helper.ok(DECRYPT_INIT, session, oaep, priv)
    assert helper.ok(DECRYPT, session, theirs, 256) == [message]


# -- symmetric ciphers ----------------------------------------------------------------

def test_aes_gcm_round_trip(helper: HelperLink, session: int) -> None:
    key = aes_key(helper, session)
    key_value = value_of(helper, session, key)
    iv, aad, message = os.urandom(12), b"header", b"GCM through a structured parameter"
    gcm = [CKM["CKM_AES_GCM"], [iv, 96, aad, 128]]
    helper.ok(ENCRYPT_INIT, session, gcm, key)
    ciphertext = helper.ok(ENCRYPT, session, message, len(message) + 16)[0]
    assert AESGCM(key_value).decrypt(iv, ciphertext, aad) == message
    helper.ok(DECRYPT_INIT, session, gcm, key)
    assert helper.ok(DECRYPT, session, ciphertext, len(ciphertext)) == [message]


def test_aes_cbc_pad_multi_part(helper: HelperLink, session: int) -> None:
    key = aes_key(helper, session)
    key_value = value_of(helper, session, key)
    iv = os.urandom(16)
    parts = [os.urandom(n) for n in (5, 16, 40, 1)]
    mechanism = [CKM["CKM_AES_CBC_PAD"], iv]  # an IV travels as plain bytes
    helper.ok(ENCRYPT_INIT, session, mechanism, key)
    ciphertext = b"".join(helper.ok(ENCRYPT_UPDATE, session, p, 64)[0] for p in parts)
    # a zero-length non-NULL buffer is a real buffer (too small here), not a query
    assert helper.call(ENCRYPT_FINAL, session, 0) == [CKR["CKR_BUFFER_TOO_SMALL"], 16]
    assert helper.call(ENCRYPT_FINAL, session, None) == [OK, 16]
    ciphertext += helper.ok(ENCRYPT_FINAL, session, 16)[0]
    encryptor = Cipher(algorithms.AES(key_value), modes.CBC(iv)).encryptor()
    plain = b"".join(parts)
    pad = 16 - len(plain) % 16
    assert ciphertext == encryptor.update(plain + bytes([pad]) * pad) + encryptor.finalize()
    helper.ok(DECRYPT_INIT, session, mechanism, key)
    out = helper.ok(DECRYPT_UPDATE, session, ciphertext[:30], 64)[0]
    out += helper.ok(DECRYPT_UPDATE, session, ciphertext[30:], 64)[0]
    out += helper.ok(DECRYPT_FINAL, session, 16)[0]
    assert out == plain


def test_zero_capacity_final_is_not_a_query(helper: HelperLink, session: int) -> None:
    key = aes_key(helper, session)
    helper.ok(ENCRYPT_INIT, session, [CKM["CKM_AES_CBC"], bytes(16)], key)
    assert len(helper.ok(ENCRYPT_UPDATE, session, bytes(32), 32)[0]) == 32
    assert helper.call(ENCRYPT_FINAL, session, 0) == [OK, b""]  # written: nothing
    # the operation ended, as after any real call (a query would have left it active)
    assert helper.call(ENCRYPT_FINAL, session, 0) == [CKR["CKR_OPERATION_NOT_INITIALIZED"], None]


def test_single_part_length_query_then_exact_buffer(helper: HelperLink, session: int) -> None:
    key = aes_key(helper, session)
    helper.ok(ENCRYPT_INIT, session, [CKM["CKM_AES_CBC_PAD"], bytes(16)], key)
    assert helper.call(ENCRYPT, session, b"x" * 20, None) == [OK, 32]
    rv, ciphertext = helper.call(ENCRYPT, session, b"x" * 20, 32)
    assert rv == OK and len(ciphertext) == 32


# -- attributes -----------------------------------------------------------------------

def test_sensitive_value_is_unavailable(helper: HelperLink, session: int) -> None:
    key = aes_key(helper, session, readable=False)
    rv, values = helper.call(GET_ATTRIBUTE_VALUE, session, key,
                             [[CKA["CKA_VALUE"], 32], [CKA["CKA_VALUE_LEN"], 8]])
    assert rv == CKR["CKR_ATTRIBUTE_SENSITIVE"]
    assert values[0] == UNAVAILABLE and attr_ulong(values[1]) == 32


def test_invalid_attribute_type_among_valid_ones(helper: HelperLink, session: int) -> None:
    key = aes_key(helper, session, LABEL=b"k1")
    rv, values = helper.call(GET_ATTRIBUTE_VALUE, session, key, [
        [CKA["CKA_LABEL"], 16], [0x7FFF0001, 8], [CKA["CKA_KEY_TYPE"], 8],
        [CKA["CKA_VALUE_LEN"], None]])
    assert rv == CKR["CKR_ATTRIBUTE_TYPE_INVALID"]
    assert values == [b"k1", UNAVAILABLE, ulong(CKK["CKK_AES"]), 8]


def test_attribute_buffer_too_small(helper: HelperLink, session: int) -> None:
    key = aes_key(helper, session, LABEL=b"a longer label")
    rv, values = helper.call(GET_ATTRIBUTE_VALUE, session, key,
                             [[CKA["CKA_LABEL"], 4], [CKA["CKA_KEY_TYPE"], 8]])
    assert rv == CKR["CKR_BUFFER_TOO_SMALL"]
    assert values == [UNAVAILABLE, ulong(CKK["CKK_AES"])]


def test_nested_wrap_template(helper: HelperLink, session: int) -> None:
    wrap_template = template(CLASS=ulong(CKO["CKO_SECRET_KEY"]), KEY_TYPE=ulong(CKK["CKK_AES"]))
    attrs = template(TOKEN=FALSE, VALUE_LEN=ulong(32), WRAP=TRUE, UNWRAP=TRUE,
                     WRAP_TEMPLATE=wrap_template)
    key = helper.ok(GENERATE_KEY, session, [CKM["CKM_AES_KEY_GEN"], None], attrs, 0)[0]
    nested = CKA["CKA_WRAP_TEMPLATE"]
    assert helper.ok(GET_ATTRIBUTE_VALUE, session, key, [[nested, None]]) == [[2]]  # a count
    room = [[CKA["CKA_CLASS"], 8], [CKA["CKA_KEY_TYPE"], 8]]
    values = helper.ok(GET_ATTRIBUTE_VALUE, session, key, [[nested, room]])[0]
    assert sorted(map(tuple, values[0])) == sorted(map(tuple, wrap_template))
    # room for more attributes than the template holds: only those returned come back
    bigger = room + [[CKA["CKA_LABEL"], 8]]
    values = helper.ok(GET_ATTRIBUTE_VALUE, session, key, [[nested, bigger]])[0]
    assert sorted(map(tuple, values[0])) == sorted(map(tuple, wrap_template))


def test_wrap_and_unwrap(helper: HelperLink, session: int) -> None:
    wrapping = aes_key(helper, session, WRAP=TRUE, UNWRAP=TRUE)
    target = aes_key(helper, session)
    wrapping_value, target_value = value_of(helper, session, wrapping), value_of(helper, session, target)
    mechanism = [CKM["CKM_AES_KEY_WRAP"], None]
    assert helper.call(WRAP_KEY, session, mechanism, wrapping, target, None) == [OK, 40]
    wrapped = helper.ok(WRAP_KEY, session, mechanism, wrapping, target, 40)[0]
    assert wrapped == aes_key_wrap(wrapping_value, target_value)
    attrs = template(CLASS=ulong(CKO["CKO_SECRET_KEY"]), KEY_TYPE=ulong(CKK["CKK_AES"]),
                     TOKEN=FALSE, SENSITIVE=FALSE, EXTRACTABLE=TRUE, ENCRYPT=TRUE)
    unwrapped = helper.ok(UNWRAP_KEY, session, mechanism, wrapping, wrapped, attrs, 0)[0]
    assert unwrapped != target and value_of(helper, session, unwrapped) == target_value


def test_wrap_template_is_enforced(helper: HelperLink, session: int) -> None:
    only_generic = template(KEY_TYPE=ulong(CKK["CKK_GENERIC_SECRET"]))
    wrapping = aes_key(helper, session, WRAP=TRUE, WRAP_TEMPLATE=only_generic)
    target = aes_key(helper, session)
    rv, _ = helper.call(WRAP_KEY, session, [CKM["CKM_AES_KEY_WRAP"], None], wrapping, target, 64)
    assert rv == CKR["CKR_KEY_NOT_WRAPPABLE"]


def test_ecdh_derives_the_same_secret(helper: HelperLink, session: int) -> None:
    pub_a, priv_a = ec_pair(helper, session)
    pub_b, priv_b = ec_pair(helper, session)
    point_a, point_b = ec_point(helper, session, pub_a), ec_point(helper, session, pub_b)
    secret = template(CLASS=ulong(CKO["CKO_SECRET_KEY"]), KEY_TYPE=ulong(CKK["CKK_GENERIC_SECRET"]),
                      VALUE_LEN=ulong(32), TOKEN=FALSE, SENSITIVE=FALSE, EXTRACTABLE=TRUE)

    def derive(priv: int, peer_point: bytes) -> bytes:
        mechanism = [CKM["CKM_ECDH1_DERIVE"], [CKD_NULL, None, peer_point]]
        key = helper.ok(DERIVE_KEY, session, mechanism, priv, secret, 0)[0]
        return value_of(helper, session, key)

    shared = derive(priv_a, point_b)
    assert len(shared) == 32 and shared == derive(priv_b, point_a)
