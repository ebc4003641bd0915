"""The data plane (README "Data plane"; client/direct.c, client/plane*.c, helper/fast.c):
once a session is bound, every operation family, random, C_GetAttributeValue and
C_GetSessionInfo go from the client library straight to the helper. The application is
PyKCS11 (with tests/ckraw.py on the same library for the calls it hides: length queries,
CKR_BUFFER_TOO_SMALL, multi-part encryption), on real SoftHSM2 tokens; every output is
checked against `cryptography` and hashlib. Then a member fails in the middle of
multi-part operations that ran on the data plane: they complete on the other member with
the same results as with the data plane off, and an operation over replay_limit is lost
once (CKR_DEVICE_ERROR), the session going on."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hakit import HAGroup, PyApp
from kit import USER_PIN
from p11p.protocol.constants import CKR

# Run in the application: a logged-in session on the group's token `h` (PyKCS11 `s`),
# and small helpers over ckraw (`R`, the same library) for the raw calls.
SETUP = f"""
import ctypes as C
from ckraw import CK_ULONG, CKA, CKM, mechanism
slot = next(x for x in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(x).label.strip() == "ha")
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
s.login({USER_PIN!r})
h = H(s)

def key(label, cls):
    (o,) = s.findObjects([(P.CKA_LABEL, label), (P.CKA_CLASS, cls)])
    return o.value()

def out(fn, *args, cap=4096):
    # (rv, the bytes written) or (rv, the length answered)
    n = CK_ULONG(cap)
    buf = (C.c_ubyte * max(cap, 1))()
    rv = fn(h, *args, buf if cap else buf, C.byref(n))
    return rv, (bytes(buf[:n.value]) if rv == 0 else n.value)

def query(fn, *args):
    n = CK_ULONG(0)
    rv = fn(h, *args, None, C.byref(n))
    return rv, n.value

def rnd(n):
    buf = (C.c_ubyte * n)()
    assert R.C_GenerateRandom(h, buf, n) == 0
    return bytes(buf)

def init(fn, mech, param=None, k=None):
    m, keep = mechanism(CKM[mech], param)
    return fn(h, C.byref(m)) if k is None else fn(h, C.byref(m), k)

aes = key("ha-aes", P.CKO_SECRET_KEY)
rsa = key("ha-rsa", P.CKO_PRIVATE_KEY)
ecc = key("ha-ec", P.CKO_PRIVATE_KEY)
for _ in range(4):  # data-plane calls through the daemon, then it binds the session
    rnd(16)
_ = h
"""

IV = bytes(range(16))


def _plane_served(group: HAGroup) -> int:
    (g,) = group.status()["groups"]
    return sum(m["direct_calls_served"] for m in g["members"])


def _keys(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _cbc(keys: dict[str, Any], data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(bytes.fromhex(keys["aes"])), modes.CBC(IV)).encryptor()
    return enc.update(padder.update(data) + padder.finalize()) + enc.finalize()


def _rsa_verify(keys: dict[str, Any], sig: bytes, data: bytes) -> None:
    public = serialization.load_pem_public_key(keys["rsa_public"].encode())
    public.verify(sig, data, asym_padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]


def _value(app: PyApp, code: str) -> Any:
    return eval(app.run(code))  # noqa: S307 - the repr of the app's own result


def test_every_family_runs_on_the_data_plane(ha_factory: Any, ha_keys: Path) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    keys = _keys(ha_keys)
    app = PyApp(group.daemon)
    try:
        app.run(SETUP)
        before = _plane_served(group)
        data = os.urandom(100)
        parts = [data[:7], data[7:50], data[50:]]
        # digest: one-part with a length query and CKR_BUFFER_TOO_SMALL, and multi-part
        got = _value(app, f"""
r = [init(R.C_DigestInit, "CKM_SHA256"), query(R.C_Digest, {data!r}, {len(data)}),
     out(R.C_Digest, {data!r}, {len(data)}, cap=16), out(R.C_Digest, {data!r}, {len(data)})]
r.append(init(R.C_DigestInit, "CKM_SHA256"))
r += [R.C_DigestUpdate(h, p, len(p)) for p in {parts!r}]
r += [query(R.C_DigestFinal), out(R.C_DigestFinal)]
_ = r""")
        digest = hashlib.sha256(data).digest()
        assert got == [0, (0, 32), (CKR["CKR_BUFFER_TOO_SMALL"], 32), (0, digest), 0, 0, 0, 0,
                       (0, 32), (0, digest)]
        # encrypt and decrypt AES-CBC-PAD (a parameter: the IV), one-part and multi-part
        got = _value(app, f"""
r = [init(R.C_EncryptInit, "CKM_AES_CBC_PAD", {IV!r}, aes), out(R.C_Encrypt, {data!r}, {len(data)})]
r.append(init(R.C_EncryptInit, "CKM_AES_CBC_PAD", {IV!r}, aes))
r.append(out(R.C_EncryptUpdate, {parts[0]!r}, {len(parts[0])}))
r.append(out(R.C_EncryptUpdate, {parts[1]!r}, {len(parts[1])}, cap=0))  # too small
r += [out(R.C_EncryptUpdate, p, len(p)) for p in {parts[1:]!r}]
r.append(out(R.C_EncryptFinal))
_ = r""")
        cipher = _cbc(keys, data)
        assert got[:3] == [0, (0, cipher), 0]
        assert got[3] == (0, b"") and got[4][0] == CKR["CKR_BUFFER_TOO_SMALL"]
        assert all(g[0] == 0 for g in got[5:])
        assert b"".join(g[1] for g in got[5:]) == cipher
        got = _value(app, f"""
r = [init(R.C_DecryptInit, "CKM_AES_CBC_PAD", {IV!r}, aes), out(R.C_Decrypt, {cipher!r}, {len(cipher)})]
r.append(init(R.C_DecryptInit, "CKM_AES_CBC_PAD", {IV!r}, aes))
r += [out(R.C_DecryptUpdate, {cipher[:40]!r}, 40), out(R.C_DecryptUpdate, {cipher[40:]!r}, {len(cipher) - 40}),
      out(R.C_DecryptFinal)]
_ = r""")
        assert got[:3] == [0, (0, data), 0] and all(g[0] == 0 for g in got[3:])
        assert b"".join(g[1] for g in got[3:]) == data
        # AES-GCM (a structured parameter, field by field) through PyKCS11
        got = _value(app, f"""
m = P.AES_GCM_Mechanism({IV[:12]!r}, b"aad", 128)
c = bytes(s.encrypt(s.findObjects([(P.CKA_LABEL, "ha-aes")])[0], {data!r}, m))
_ = [c, bytes(s.decrypt(s.findObjects([(P.CKA_LABEL, "ha-aes")])[0], c, m))]""")
        assert got[1] == data and len(got[0]) == len(data) + 16
        # sign: ECDSA one-part (PyKCS11), RSA with SHA-256 multi-part; verify on the token
        got = _value(app, f"""
o = s.findObjects([(P.CKA_LABEL, "ha-ec"), (P.CKA_CLASS, P.CKO_PRIVATE_KEY)])[0]
e = bytes(s.sign(o, {digest!r}, P.Mechanism(P.CKM_ECDSA)))
r = [init(R.C_SignInit, "CKM_SHA256_RSA_PKCS", None, rsa)]
r += [R.C_SignUpdate(h, p, len(p)) for p in {parts!r}]
r += [query(R.C_SignFinal), out(R.C_SignFinal, cap=8), out(R.C_SignFinal)]
_ = [e, r]""")
        ecsig, r = got
        assert r[:4] == [0, 0, 0, 0] and r[4] == (0, 256)
        assert r[5] == (CKR["CKR_BUFFER_TOO_SMALL"], 256) and r[6][0] == 0
        _rsa_verify(keys, r[6][1], data)
        ecpub = serialization.load_pem_public_key(keys["ec_public"].encode())
        ecpub.verify(encode_dss_signature(int.from_bytes(ecsig[:32], "big"),  # type: ignore[union-attr]
                                          int.from_bytes(ecsig[32:], "big")),
                     digest, ec.ECDSA(Prehashed(hashes.SHA256())))  # type: ignore[call-arg]
        rsasig = r[6][1]
        # verify with a session public key made through the daemon, one-part and multi-part
        public = serialization.load_pem_public_key(keys["rsa_public"].encode())
        numbers = public.public_numbers()  # type: ignore[union-attr]
        got = _value(app, f"""
pub = s.createObject([(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_RSA),
                      (P.CKA_TOKEN, False), (P.CKA_VERIFY, True),
                      (P.CKA_MODULUS, {numbers.n.to_bytes(256, "big")!r}),
                      (P.CKA_PUBLIC_EXPONENT, {numbers.e.to_bytes(3, "big")!r})]).value()
sig = {rsasig!r}
r = [init(R.C_VerifyInit, "CKM_SHA256_RSA_PKCS", None, pub), R.C_Verify(h, {data!r}, {len(data)}, sig, 256)]
r += [init(R.C_VerifyInit, "CKM_SHA256_RSA_PKCS", None, pub)]
r += [R.C_VerifyUpdate(h, p, len(p)) for p in {parts!r}] + [R.C_VerifyFinal(h, sig, 256)]
r += [init(R.C_VerifyInit, "CKM_SHA256_RSA_PKCS", None, pub), R.C_VerifyUpdate(h, b"x", 1),
      R.C_VerifyFinal(h, sig, 256)]
_ = r""")
        assert got == [0, 0, 0, 0, 0, 0, 0, 0, 0, CKR["CKR_SIGNATURE_INVALID"]]
        # attributes, session info (the virtual slot), random, seed
        got = _value(app, """
a = s.getAttributeValue(s.findObjects([(P.CKA_LABEL, "ha-aes")])[0], [P.CKA_LABEL, P.CKA_KEY_TYPE])
i = s.getSessionInfo()
_ = [a[0] if isinstance(a[0], str) else bytes(a[0]).decode(), a[1], i.slotID == slot, i.state, len(rnd(64)), R.C_SeedRandom(h, b"seed", 4)]""")
        assert got[:5] == ["ha-aes", 0x1F, True, 3, 64]  # CKK_AES, CKS_RW_USER_FUNCTIONS
        assert got[5] in (0, CKR["CKR_RANDOM_SEED_NOT_SUPPORTED"])
        served = _plane_served(group) - before
        assert served >= 50, served  # (55 calls of the data plane here, all on it)
        assert group.member("hsmA")["state"] == "OK"
    finally:
        app.close()


# Three multi-part operations begun on the data plane, each in a session of its own
# (SoftHSM2 runs one operation per session), and the helper of that application on
# their member killed between updates.
BEGIN = f"""
def bound():
    global h
    h = H(lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION))
    for _ in range(4):
        rnd(16)
    return h
hE, hD, hS = bound(), bound(), bound()
h = hE
r = [init(R.C_EncryptInit, "CKM_AES_CBC_PAD", {IV!r}, aes)]
r += [out(R.C_EncryptUpdate, PARTS[0], len(PARTS[0])), out(R.C_EncryptUpdate, PARTS[1], len(PARTS[1]))]
h = hD
r += [init(R.C_DigestInit, "CKM_SHA256"), R.C_DigestUpdate(h, PARTS[0], len(PARTS[0])),
      query(R.C_DigestFinal), R.C_DigestUpdate(h, PARTS[1], len(PARTS[1]))]
h = hS
r += [init(R.C_SignInit, "CKM_SHA256_RSA_PKCS", None, rsa), R.C_SignUpdate(h, PARTS[0], len(PARTS[0])),
      R.C_SignUpdate(h, PARTS[1], len(PARTS[1]))]
_ = r"""
FINISH = """
h = hE
r = [out(R.C_EncryptUpdate, PARTS[2], len(PARTS[2])), out(R.C_EncryptFinal)]
h = hD
r += [R.C_DigestUpdate(h, PARTS[2], len(PARTS[2])), out(R.C_DigestFinal)]
h = hS
r += [R.C_SignUpdate(h, PARTS[2], len(PARTS[2])), out(R.C_SignFinal)]
_ = r"""


@pytest.mark.parametrize("plane", ["on", "off"])
def test_multi_part_operations_survive_their_member(ha_factory: Any, ha_keys: Path,
                                                    plane: str) -> None:
    """The same sequence with the data plane on and off gives the same answers: the
    encryption, the digest and the signature are those of the whole data, made on hsmB
    after the replay."""
    extra = "" if plane == "on" else "direct_calls = false"
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"], extra=extra)
    keys = _keys(ha_keys)
    data = os.urandom(90)
    parts = [data[:20], data[20:45], data[45:]]
    app = PyApp(group.daemon)
    try:
        app.run(SETUP + f"\nPARTS = {parts!r}\n")
        before = _plane_served(group)
        begun = _value(app, BEGIN)
        assert [b if isinstance(b, int) else b[0] for b in begun] == [0] * 10
        on_plane = _plane_served(group) - before
        assert (on_plane >= 10) if plane == "on" else on_plane == 0, on_plane
        os.kill(group.app_helper(app.proc.pid, "hsmA"), signal.SIGKILL)
        got = _value(app, FINISH)
        assert [g if isinstance(g, int) else g[0] for g in got] == [0] * 6, got
        cipher = begun[1][1] + begun[2][1] + got[0][1] + got[1][1]
        assert cipher == _cbc(keys, data)
        assert got[3][1] == hashlib.sha256(data).digest()
        _rsa_verify(keys, got[5][1], data)
        assert group.member("hsmA")["state"] != "OK" or "member failure detected: group=ha "\
            "member=hsmA" in group.daemon.log_text()
        assert group.member("hsmB")["calls_served"] > 0
    finally:
        app.close()


@pytest.mark.parametrize("plane", ["on", "off"])
def test_an_operation_over_replay_limit_is_lost_once(ha_factory: Any, plane: str) -> None:
    """replay_limit = 64: a digest that consumed 80 bytes cannot be replayed; after its
    member fails, its next call answers CKR_DEVICE_ERROR, the one after that finds no
    operation, and the session goes on (a new digest is right). A sign operation within
    the limit, in another session, completes."""
    extra = "replay_limit = 64" + ("" if plane == "on" else "\ndirect_calls = false")
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"], extra=extra)
    app = PyApp(group.daemon)
    try:
        app.run(SETUP)
        got = _value(app, """
hD = h
r = [init(R.C_DigestInit, "CKM_SHA256"), R.C_DigestUpdate(h, b"a" * 40, 40), R.C_DigestUpdate(h, b"b" * 40, 40)]
h = H(lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION))
for _ in range(4):
    rnd(16)
hS = h
r += [init(R.C_SignInit, "CKM_SHA256_RSA_PKCS", None, rsa), R.C_SignUpdate(h, b"c" * 30, 30)]
_ = r""")
        assert got == [0] * 5
        os.kill(group.app_helper(app.proc.pid, "hsmA"), signal.SIGKILL)
        got = _value(app, """
h = hD
r = [R.C_DigestUpdate(h, b"c", 1), out(R.C_DigestFinal)[0]]
h = hS
r += [R.C_SignUpdate(h, b"d", 1), out(R.C_SignFinal)[0]]
h = hD
r += [init(R.C_DigestInit, "CKM_SHA256"), out(R.C_Digest, b"abc", 3)]
_ = r""")
        assert got[:6] == [CKR["CKR_DEVICE_ERROR"], CKR["CKR_OPERATION_NOT_INITIALIZED"], 0, 0, 0,
                           (0, hashlib.sha256(b"abc").digest())], got
    finally:
        app.close()


def _ec_verify(keys: dict[str, Any], sig: bytes, digest: bytes) -> None:
    public = serialization.load_pem_public_key(keys["ec_public"].encode())
    public.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"),  # type: ignore[union-attr]
                                       int.from_bytes(sig[32:], "big")),
                  digest, ec.ECDSA(Prehashed(hashes.SHA256())))  # type: ignore[call-arg]


SIGN_EC = """
def sign_ec(d, k=None):
    return [init(R.C_SignInit, "CKM_ECDSA", None, ecc if k is None else k), out(R.C_Sign, d, 32)]
"""


def test_an_init_answered_before_goes_with_the_next_call(ha_factory: Any, ha_keys: Path) -> None:
    """An init the member answered CKR_OK before (same mechanism, same key) is answered
    at once and sent with the operation's next call (client/plane_memo.c, deferred inits):
    each signature verifies; a second init beside it is answered as the module answers
    it (CKR_OPERATION_ACTIVE), and the first operation's signature follows; the member
    failing between the init and the call, the operation completes on the other."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    keys = _keys(ha_keys)
    digests = [hashlib.sha256(b"deferred %d" % i).digest() for i in range(6)]
    app = PyApp(group.daemon)
    try:
        app.run(SETUP + SIGN_EC + f"\nD = {digests!r}\n")
        signed = _value(app, "_ = [sign_ec(d) for d in D[:3]]")
        for d, (init_rv, (rv, sig)) in zip(digests, signed, strict=False):
            assert init_rv == 0 and rv == 0
            _ec_verify(keys, sig, d)
        got = _value(app, """_ = [init(R.C_SignInit, "CKM_ECDSA", None, ecc),
     init(R.C_SignInit, "CKM_ECDSA", None, ecc), out(R.C_Sign, D[3], 32)]""")
        assert got[:2] == [0, CKR["CKR_OPERATION_ACTIVE"]] and got[2][0] == 0, got
        _ec_verify(keys, got[2][1], digests[3])
        assert _value(app, '_ = init(R.C_SignInit, "CKM_ECDSA", None, ecc)') == 0
        os.kill(group.app_helper(app.proc.pid, "hsmA"), signal.SIGKILL)
        rv, sig = _value(app, "_ = out(R.C_Sign, D[4], 32)")
        assert rv == 0
        _ec_verify(keys, sig, digests[4])
        (init_rv, (rv, sig)), = _value(app, "_ = [sign_ec(D[5])]")
        assert init_rv == 0 and rv == 0
        _ec_verify(keys, sig, digests[5])
    finally:
        app.close()


def test_a_deferred_init_the_module_refuses_answers_at_the_next_call(ha_factory: Any) -> None:
    """The init was answered CKR_OK here (the same key signed before) and another
    application destroyed the key since: the call that sends it answers the refusal (not
    CKR_DEVICE_ERROR), the operation is over (CKR_OPERATION_NOT_INITIALIZED next), and
    the next init goes to the member at once (refused there)."""
    group: HAGroup = ha_factory("failover", ["hsmA"])
    app, other = PyApp(group.daemon), PyApp(group.daemon)
    try:
        app.run(SETUP + SIGN_EC + """
pub, priv = s.generateKeyPair(
    [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_TOKEN, True), (P.CKA_VERIFY, True),
     (P.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")), (P.CKA_LABEL, "deferred-x")],
    [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_TOKEN, True), (P.CKA_PRIVATE, True),
     (P.CKA_SIGN, True), (P.CKA_LABEL, "deferred-x")], mecha=P.MechanismECGENERATEKEYPAIR)
kx = priv.value()
""")
        assert _value(app, "_ = [sign_ec(b'1' * 32, kx)[1][0] for _ in range(2)]") == [0, 0]
        other.run(SETUP + """
(k,) = s.findObjects([(P.CKA_LABEL, "deferred-x"), (P.CKA_CLASS, P.CKO_PRIVATE_KEY)])
s.destroyObject(k)
""")
        got = _value(app, """_ = [init(R.C_SignInit, "CKM_ECDSA", None, kx), out(R.C_Sign, b"2" * 32, 32)[0],
     out(R.C_Sign, b"2" * 32, 32)[0], init(R.C_SignInit, "CKM_ECDSA", None, kx)]""")
        assert got[0] == 0 and got[1] not in (0, CKR["CKR_DEVICE_ERROR"]), got
        assert got[2] == CKR["CKR_OPERATION_NOT_INITIALIZED"] and got[3] != 0, got
        # the session goes on: the group's own key signs
        assert _value(app, "_ = sign_ec(b'3' * 32)[1][0]") == 0
    finally:
        app.close()
        other.close()


def test_calls_of_every_size_cross_the_mailbox(ha_factory: Any) -> None:
    """A bound session's calls travel through the connection's mailbox (protocol/p11p-box.h:
    the application and its helper map it), whatever their size: inputs and outputs
    either side of the mailbox's area (64 KiB) go on the socket, the rest in shared
    memory; a pause longer than the helper's watch (0.2 s) sends its thread back to the
    socket and the next call brings it back. Every digest is hashlib's, every random
    output as long as asked; all of it on the data plane."""
    group: HAGroup = ha_factory("failover", ["hsmA"])
    app = PyApp(group.daemon)
    try:
        app.run(SETUP + """
def sha(d):
    return [init(R.C_DigestInit, "CKM_SHA256"), out(R.C_Digest, d, len(d), cap=32)]
""")
        before = _plane_served(group)
        area = (128 << 10) // 2 - 32
        sizes = [0, 1, 4000, area - 200, area - 40, area + 1, area + 5000, 1 << 20]
        datas = [os.urandom(n) for n in sizes]
        got = _value(app, f"_ = [sha(d) for d in {datas!r}]")
        assert got == [[0, (0, hashlib.sha256(d).digest())] for d in datas]
        lengths = _value(app, "_ = [len(rnd(n)) for n in (16, 60000, 70000, 200000, 16)]")
        assert lengths == [16, 60000, 70000, 200000, 16]
        app.run("import time; time.sleep(0.5)")
        assert _value(app, f"_ = [sha(d) for d in {datas[2:4]!r}]") == [
            [0, (0, hashlib.sha256(d).digest())] for d in datas[2:4]]
        assert _plane_served(group) - before >= 2 * len(sizes) + 5 + 4
        helper = group.app_helper(app.proc.pid, "hsmA")
        for pid in (app.proc.pid, helper):
            assert "memfd:p11p-box" in Path(f"/proc/{pid}/maps").read_text(), pid
    finally:
        app.close()


def test_a_forked_child_leaves_its_parents_mailboxes_alone(ha_factory: Any) -> None:
    """A child forgets the connections it inherited (client/state.c, fork handlers)
    without a word on them: its parent's idle connection keeps its mailbox, and the
    parent's next calls are served on the data plane at once, none of them sent to the
    daemon after a broken connection."""
    group: HAGroup = ha_factory("failover", ["hsmA"])
    app = PyApp(group.daemon)
    try:
        app.run(SETUP)
        child = _value(app, """
import os
for _ in range(3):
    rnd(16)
pid = os.fork()  # the connection idle, its helper thread watching the mailbox
if pid == 0:
    os._exit(0)
_ = os.waitpid(pid, 0)[1]""")
        assert child == 0
        before = _plane_served(group)
        assert _value(app, "_ = [len(rnd(16)) for _ in range(10)]") == [16] * 10
        assert _plane_served(group) - before == 10
    finally:
        app.close()
