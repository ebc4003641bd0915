"""Many calls in flight on one helper: all are answered, each correctly, and a slow
call does not hold up quick ones (replies come back in any order)."""

from __future__ import annotations

import time
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from helperfixtures import *  # noqa: F403  (the fixtures)
from helperlink import FALSE, TRUE, HelperLink, template, ulong
from p11p.protocol.constants import CKA, CKM, CKR

P256 = bytes.fromhex("06082a8648ce3d030107")
SIGN_INIT, SIGN, CLOSE_SESSION, GENERATE_KEY_PAIR, GENERATE_RANDOM = 43, 44, 14, 60, 65


def _ec_key(helper: HelperLink, session: int) -> tuple[int, ec.EllipticCurvePublicKey]:
    pub, priv = helper.ok(GENERATE_KEY_PAIR, session, [CKM["CKM_EC_KEY_PAIR_GEN"], None],
                          template(TOKEN=FALSE, EC_PARAMS=P256, VERIFY=TRUE),
                          template(TOKEN=FALSE, PRIVATE=TRUE, SIGN=TRUE), 0, 0)
    der = helper.get_attributes(session, pub, [CKA["CKA_EC_POINT"]])[CKA["CKA_EC_POINT"]]
    return int(priv), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), der[2:])


def _verify(public: ec.EllipticCurvePublicKey, digest: bytes, signature: bytes) -> None:
    der = utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                     int.from_bytes(signature[32:], "big"))
    public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_sixteen_signatures_in_flight(helper: HelperLink, slot: int, session: int) -> None:
    priv, public = _ec_key(helper, session)
    sessions = [helper.open_session(slot, login=False) for _ in range(16)]
    digests = [sha256(b"message %d" % i).digest() for i in range(16)]
    for s in sessions:
        helper.ok(SIGN_INIT, s, [CKM["CKM_ECDSA"], None], priv)
    start = time.perf_counter()
    ids = [helper.send(SIGN, s, d, 64) for s, d in zip(sessions, digests, strict=True)]  # none awaited
    replies = [helper.reply(i) for i in ids]
    elapsed = time.perf_counter() - start
    for (call_id, rv, signature), expected_id, digest in zip(replies, ids, digests, strict=True):
        assert call_id == expected_id and rv == CKR["CKR_OK"] and len(signature) == 64
        _verify(public, digest, signature)
    assert set(ids) <= set(helper.arrival_order)
    print(f"16 ECDSA signatures in flight: {elapsed * 1e3:.1f} ms")
    for s in sessions:
        helper.ok(CLOSE_SESSION, s)


def test_a_slow_call_does_not_hold_up_quick_ones(helper: HelperLink, session: int) -> None:
    keygen = helper.send(GENERATE_KEY_PAIR, session, [CKM["CKM_RSA_PKCS_KEY_PAIR_GEN"], None],
                         template(TOKEN=FALSE, VERIFY=TRUE, MODULUS_BITS=ulong(3072),
                                  PUBLIC_EXPONENT=b"\x01\x00\x01"),
                         template(TOKEN=FALSE, PRIVATE=TRUE, SIGN=TRUE), 0, 0)
    quick = [helper.send(GENERATE_RANDOM, session, 16) for _ in range(5)]
    for call_id in quick:
        assert helper.reply(call_id)[1] == CKR["CKR_OK"]
    assert helper.reply(keygen, timeout=60)[1] == CKR["CKR_OK"]
    order = helper.arrival_order
    assert all(order.index(q) < order.index(keygen) for q in quick), \
        "the random numbers waited for the key generation"


def test_concurrent_mixed_calls_all_answered(helper: HelperLink, session: int) -> None:
    ids = []
    for i in range(200):
        ids.append(helper.send(GENERATE_RANDOM, session, i % 64))
        ids.append(helper.send(-1))
    replies = {i: helper.reply(i) for i in ids}
    for n, call_id in enumerate(ids):
        if n % 2 == 0:
            assert replies[call_id][1:] == [CKR["CKR_OK"], replies[call_id][2]]
            assert len(replies[call_id][2]) == (n // 2) % 64
        else:
            assert replies[call_id] == [call_id, CKR["CKR_OK"], helper.pid]
