"""Signature length queries on the data plane (client/plane_memo.c, "signature lengths"): the
two-call convention (C_Sign with a NULL buffer for the length, then C_Sign) costs one
round trip once the member has answered that query for the key and mechanism.

PyKCS11 signs that way. Three keys of different signature lengths (ECDSA P-256: 64
bytes; RSA-1024 and RSA-2048 under the same mechanism: 128 and 256) sign in turn; every
signature has its key's length and verifies, and the helper served two calls per
signature (init, sign), not three."""

from __future__ import annotations

import os
import subprocess
import sys

from kit import CLIENT_SO, USER_PIN, Daemon

SCRIPT = f"""
import PyKCS11
from PyKCS11 import Mechanism
lib = PyKCS11.PyKCS11Lib()
lib.load({str(CLIENT_SO)!r})
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == "signing")
s = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
s.login({USER_PIN!r})
P256 = bytes.fromhex("06082a8648ce3d030107")
def pair(mech, pub, priv):
    return s.generateKeyPair([(PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_VERIFY, True)] + pub,
                             [(PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_SIGN, True),
                              (PyKCS11.CKA_PRIVATE, True)] + priv, mecha=Mechanism(mech))
keys = [("ec", *pair(PyKCS11.CKM_EC_KEY_PAIR_GEN, [(PyKCS11.CKA_EC_PARAMS, P256)], []),
         Mechanism(PyKCS11.CKM_ECDSA), 64)]
for bits in (1024, 2048):
    keys.append((f"rsa{{bits}}", *pair(PyKCS11.CKM_RSA_PKCS_KEY_PAIR_GEN,
                                      [(PyKCS11.CKA_MODULUS_BITS, bits),
                                       (PyKCS11.CKA_PUBLIC_EXPONENT, (1, 0, 1))], []),
                 Mechanism(PyKCS11.CKM_RSA_PKCS), bits // 8))
data = bytes(range(32))
for name, pub, priv, mech, size in keys * 2:  # the session is bound after its first calls
    s.verify(pub, data, s.sign(priv, data, mech), mech)
input("warm")  # the test reads the helper's count here
for i in range(15):
    for name, pub, priv, mech, size in keys:
        mine, other = bytes([i]) + data[1:], bytes([i + 1]) + data[1:]  # ECDSA: 32 bytes
        sig = bytes(s.sign(priv, mine, mech))
        assert len(sig) == size, (name, len(sig))
        assert s.verify(pub, mine, sig, mech), name
        assert not s.verify(pub, other, sig, mech), name
print("signed", 15 * len(keys))
"""


def _served(d: Daemon) -> int:
    from p11p.daemon.cli import admin_request
    status = admin_request(d.socket.with_name(d.socket.name + ".admin"), {"cmd": "status"})
    return sum(m["direct_calls_served"] for g in status["groups"] for m in g["members"])


def test_a_signature_s_length_query_is_answered_from_the_member_s_answer(daemon: Daemon) -> None:
    app = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **daemon.env})
    try:
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.read(4) == "warm", app.stderr.read() if app.stderr else ""
        before = _served(daemon)
        app.stdin.write("\n")
        app.stdin.flush()
        out, err = app.communicate(timeout=120)
    finally:
        app.kill()
    assert app.returncode == 0, err
    assert out.split()[-2:] == ["signed", "45"]
    served = _served(daemon) - before
    # per signature: C_SignInit, C_Sign, and two verifications (C_VerifyInit, C_Verify
    # each): 6 on the data plane; the length query would make it 7
    assert 6 * 45 - 6 <= served <= 6 * 45 + 3, served
