"""write_policy = "all" (issue 15): token objects written through p11p are on every
member: created, copied, changed and destroyed everywhere; a generated key pair is
wrapped with replicate_with (ha-kek) on its member and unwrapped on the others, so it
signs after that member fails; a key that cannot be replicated is refused with the
member's code and left nowhere. Each token is checked directly (SoftHSM2, no p11p)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hakit import CKRError, HAGroup, PyApp, ha_softhsm
from kit import SOFTHSM_SO, USER_PIN, SoftHSM, shows_pin, wait_for
from p11p.protocol.constants import CKR

APP = f"""
import os
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
slot = lib.getSlotList(tokenPresent=True)[0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
s.login("{USER_PIN}")
def one(label, cls):
    found = s.findObjects([(P.CKA_LABEL, label), (P.CKA_CLASS, cls)])
    assert len(found) == 1, found
    return found[0]
def signs(label):
    priv, pub = one(label, P.CKO_PRIVATE_KEY), one(label, P.CKO_PUBLIC_KEY)
    digest = os.urandom(32)
    sig = bytes(s.sign(priv, digest, P.Mechanism(P.CKM_ECDSA)))
    point = bytes(s.getAttributeValue(pub, [P.CKA_EC_POINT])[0])[2:]
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    r, t = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    key.verify(encode_dss_signature(r, t), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    return True
def pair(label, extractable):
    return s.generateKeyPair(
        [(P.CKA_TOKEN, True), (P.CKA_LABEL, label), (P.CKA_EC_PARAMS, bytes.fromhex(
            "06082a8648ce3d030107")), (P.CKA_VERIFY, True)],
        [(P.CKA_TOKEN, True), (P.CKA_LABEL, label), (P.CKA_PRIVATE, True), (P.CKA_SIGN, True),
         (P.CKA_SENSITIVE, True), (P.CKA_EXTRACTABLE, extractable)],
        P.Mechanism(P.CKM_EC_KEY_PAIR_GEN))
"""

COUNT = f"""
slot = [t for t in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(t).label.strip() == TOKEN][0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION)
s.login("{USER_PIN}")
_ = sorted((int(s.getAttributeValue(o, [P.CKA_CLASS])[0]),
            bytes(s.getAttributeValue(o, [P.CKA_VALUE])[0] or b"").hex()
            if int(s.getAttributeValue(o, [P.CKA_CLASS])[0]) == 0 else "")
           for o in s.findObjects([(P.CKA_LABEL, LABEL)]))
s.logout()
"""


@pytest.fixture(scope="module")
def all_tokens(tmp_path_factory: pytest.TempPathFactory, ha_keys: Path) -> SoftHSM:
    return ha_softhsm(tmp_path_factory.mktemp("write-all-softhsm"), ha_keys, ("hsmA", "hsmB"))


@pytest.fixture
def group(tmp_path: Path, all_tokens: SoftHSM) -> Iterator[HAGroup]:
    g = HAGroup(tmp_path / "g", all_tokens, "failover", ["hsmA", "hsmB"],
                extra='write_policy = "all"\nreplicate_with = "ha-kek"')
    g.daemon.start()
    yield g
    g.daemon.stop()


def on_token(hsm: SoftHSM, token: str, label: str) -> list[Any]:
    """(class, value of a data object) of each object labelled `label` on one token,
    read from SoftHSM2 directly."""
    app = PyApp(None, SOFTHSM_SO, env=hsm.env)
    try:
        return list(eval(app.run(f"TOKEN = {token!r}\nLABEL = {label!r}\n" + COUNT)))
    finally:
        app.close()


def signs_without_hsm_a(group: HAGroup, app: PyApp, label: str) -> None:
    """The key pair `label` signs (verified) with hsmA failed; then it goes."""
    group.set_rules("hsmA", "* error rv=CKR_DEVICE_ERROR\n")
    assert app.run(f"_ = signs({label!r})") == "True"
    group.set_rules("hsmA", "")
    group.wait_state("hsmA", "OK", timeout=15)
    app.run(f"s.destroyObject(one({label!r}, P.CKO_PRIVATE_KEY)); "
            f"s.destroyObject(one({label!r}, P.CKO_PUBLIC_KEY))")


def test_a_generated_key_pair_signs_after_its_member_fails(group: HAGroup,
                                                           all_tokens: SoftHSM) -> None:
    app = PyApp(group.daemon)
    try:
        app.run(APP + "pub, priv = pair('gen-all', True)")
        assert app.run("_ = signs('gen-all')") == "True"
        for token in ("hsmA", "hsmB"):  # a private key (3) and a public key (2) on each
            assert sorted(c for c, _ in on_token(all_tokens, token, "gen-all")) == [2, 3], token
        group.set_rules("hsmA", "* error rv=CKR_DEVICE_ERROR\n")
        assert app.run("_ = signs('gen-all')") == "True"  # found again and signed on hsmB
        assert group.member("hsmA")["state"] != "OK"
        other = PyApp(group.daemon)
        try:
            assert other.run(APP + "_ = signs('gen-all')") == "True"
        finally:
            other.close()
        group.set_rules("hsmA", "")
        app.run("s.destroyObject(one('gen-all', P.CKO_PRIVATE_KEY)); "
                "s.destroyObject(one('gen-all', P.CKO_PUBLIC_KEY))")
    finally:
        group.set_rules("hsmA", "")
        app.close()


def test_a_key_that_cannot_be_replicated_is_refused_and_left_nowhere(
        group: HAGroup, all_tokens: SoftHSM) -> None:
    app = PyApp(group.daemon)
    try:
        app.run(APP)
        with pytest.raises(CKRError) as err:
            app.run("pair('gen-stuck', False)")
        assert err.value.rv == CKR["CKR_KEY_UNEXTRACTABLE"], err.value
        for token in ("hsmA", "hsmB"):
            assert on_token(all_tokens, token, "gen-stuck") == [], token
    finally:
        app.close()
    assert "token object write refused" in group.daemon.log_text()


def test_objects_are_created_changed_and_destroyed_on_every_member(
        group: HAGroup, all_tokens: SoftHSM) -> None:
    app = PyApp(group.daemon)
    try:
        app.run(APP + """
d = s.createObject([(P.CKA_CLASS, P.CKO_DATA), (P.CKA_TOKEN, True), (P.CKA_PRIVATE, False),
                    (P.CKA_LABEL, "all-data"), (P.CKA_VALUE, b"one")])
""")
        for token in ("hsmA", "hsmB"):
            assert on_token(all_tokens, token, "all-data") == [(0, b"one".hex())], token
        app.run("s.setAttributeValue(d, [(P.CKA_LABEL, 'all-two')])")
        for token in ("hsmA", "hsmB"):
            assert on_token(all_tokens, token, "all-data") == [], token
            assert on_token(all_tokens, token, "all-two") == [(0, b"one".hex())], token
        app.run("""
t, n, keep = ckraw.template((P.CKA_LABEL, b"all-copy"))
out = ckraw.CK_ULONG()
assert R.C_CopyObject(H(s), d.value(), t, n, ckraw.C.byref(out)) == 0
""")
        for token in ("hsmA", "hsmB"):
            assert on_token(all_tokens, token, "all-copy") == [(0, b"one".hex())], token
        app.run("s.destroyObject(d); s.destroyObject(one('all-copy', P.CKO_DATA))")
        for token in ("hsmA", "hsmB"):
            assert on_token(all_tokens, token, "all-two") == [], token
            assert on_token(all_tokens, token, "all-copy") == [], token
    finally:
        app.close()


def test_a_member_that_returns_is_brought_up_to_date(group: HAGroup,
                                                     all_tokens: SoftHSM) -> None:
    """hsmB is out while the application creates a data object, generates a key pair and
    destroys an object both members had. When it returns (recovery, with the PIN the
    logged-in application holds), it gets what it lacks and loses what went, before it
    takes calls: then the key signs with hsmA failed."""
    app = PyApp(group.daemon)
    try:
        app.run(APP + """
def data(label):
    return s.createObject([(P.CKA_CLASS, P.CKO_DATA), (P.CKA_TOKEN, True),
                           (P.CKA_PRIVATE, False), (P.CKA_LABEL, label),
                           (P.CKA_VALUE, label.encode())])
gone = data("gone-out")
""")
        assert on_token(all_tokens, "hsmB", "gone-out") == [(0, b"gone-out".hex())]
        group.set_rules("hsmB", "* error rv=CKR_DEVICE_ERROR\n")
        group.wait_state("hsmB", "FAILED", timeout=15)
        app.run("s.destroyObject(gone); kept = data('while-out'); pair('gen-out', True)")
        assert on_token(all_tokens, "hsmB", "while-out") == []
        group.set_rules("hsmB", "")
        group.wait_state("hsmB", "OK", timeout=15)
        assert on_token(all_tokens, "hsmB", "while-out") == [(0, b"while-out".hex())]
        assert sorted(c for c, _ in on_token(all_tokens, "hsmB", "gen-out")) == [2, 3]
        assert on_token(all_tokens, "hsmB", "gone-out") == []
        assert "member brought up to date: group=ha member=hsmB" in group.daemon.log_text()
        signs_without_hsm_a(group, app, "gen-out")
        app.run("s.destroyObject(kept)")
    finally:
        for t in ("hsmA", "hsmB"):
            group.set_rules(t, "")
        app.close()


def _keys(group: HAGroup, *extra: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11p.daemon", "keys", "ha", "--config",
                           str(group.daemon.config), *extra], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_keys_reports_a_key_one_member_lacks(group: HAGroup, all_tokens: SoftHSM) -> None:
    """A private key made on hsmA behind p11p's back: `p11p keys ha --pin -` lists it
    for hsmA only, marks it and exits 1 (the PIN, read from stdin, is shown nowhere);
    without --pin the private key is not seen and the members agree on the rest."""
    r = _keys(group, "--pin", "-", stdin=USER_PIN + "\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "members agree" in r.stdout and "ha-ec" in r.stdout
    direct = PyApp(None, SOFTHSM_SO, env=all_tokens.env)
    make = f"""
slot = [t for t in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(t).label.strip() == "hsmA"][0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
s.login("{USER_PIN}")
k = s.generateKey([(P.CKA_TOKEN, True), (P.CKA_LABEL, "only-on-a"), (P.CKA_VALUE_LEN, 32),
                   (P.CKA_PRIVATE, True)], P.Mechanism(P.CKM_AES_KEY_GEN))
"""
    try:
        direct.run(make)
        r = _keys(group, "--pin", "-", stdin=USER_PIN + "\n")
        print(r.stdout)
        assert r.returncode == 1, r.stdout + r.stderr
        line = next(x for x in r.stdout.splitlines() if "only-on-a" in x)
        assert line.startswith("*") and "secret-key" in line and "lacking: hsmB" in line, line
        assert not shows_pin(r.stdout + r.stderr)
        public = _keys(group)
        assert public.returncode == 0 and "only-on-a" not in public.stdout, public.stdout
        assert "public objects only" in public.stdout
    finally:
        direct.run("s.destroyObject(k)")
        direct.close()
    assert _keys(group, "--pin", "-", stdin=USER_PIN + "\n").returncode == 0
    assert not shows_pin(group.daemon.log_text())


def test_private_keys_follow_at_the_next_login(group: HAGroup, all_tokens: SoftHSM) -> None:
    """hsmB answers again while no application is logged in: only public objects can be
    compared then, and it stays out of service. The next application that logs in
    brings the private key over, and hsmB returns."""
    app = PyApp(group.daemon)
    try:
        group.set_rules("hsmB", "* error rv=CKR_DEVICE_ERROR\n")
        group.wait_state("hsmB", "FAILED", timeout=15)
        app.run(APP + "pair('late', True)")
    finally:
        app.close()
    group.set_rules("hsmB", "")
    assert wait_for(lambda: "member waits for a login: group=ha member=hsmB"
                    in group.daemon.log_text(), 15)
    assert sorted(c for c, _ in on_token(all_tokens, "hsmB", "late")) == [2]  # public only
    time.sleep(1)  # recovery does not put it back meanwhile
    assert group.member("hsmB")["state"] == "RECOVERING", group.member("hsmB")
    later = PyApp(group.daemon)
    try:
        later.run(APP)
        group.wait_state("hsmB", "OK", timeout=15)
        assert sorted(c for c, _ in on_token(all_tokens, "hsmB", "late")) == [2, 3]
        signs_without_hsm_a(group, later, "late")
    finally:
        for t in ("hsmA", "hsmB"):
            group.set_rules(t, "")
        later.close()
