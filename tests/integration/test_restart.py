"""Daemon restarts that applications do not notice (daemon/resume.py, README
"Operations"): under an 8-thread signing load, the daemon is stopped (SIGTERM) and
started again, then killed (SIGKILL) and started again; every signature made meanwhile
verifies (checked with `cryptography`, not by the token), no call fails and none takes
3 s; afterwards the application's first session is still logged in, its object handles
name the same keys, a search and a new session work, and the helpers that served it
before are the ones serving it after (their module instance kept the login)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit import CLIENT_SO, SOFTHSM_SO, USER_PIN, Daemon, SoftHSM, helper_pids, one_member_group

APP = f"""
import json, os, sys, threading, time
import PyKCS11
from PyKCS11 import Mechanism
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

lib = PyKCS11.PyKCS11Lib()
lib.load({str(CLIENT_SO)!r})
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == "restart")
RW = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
s0 = lib.openSession(slot, RW)
s0.login({USER_PIN!r})
priv = s0.findObjects([(PyKCS11.CKA_LABEL, "restart-key"),
                       (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)])[0]
pub = s0.findObjects([(PyKCS11.CKA_LABEL, "restart-key"),
                      (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY)])[0]
point = bytes(s0.getAttributeValue(pub, [PyKCS11.CKA_EC_POINT])[0])[2:]  # DER OCTET STRING
key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
mech = Mechanism(PyKCS11.CKM_ECDSA)
stop = threading.Event()
lock = threading.Lock()
stats = {{"signed": 0, "errors": [], "slowest": 0.0}}

def worker(n):
    s = lib.openSession(slot, RW)
    i = 0
    while not stop.is_set():
        digest = hashes.Hash(hashes.SHA256())
        digest.update(b"%d-%d" % (n, i))
        data = digest.finalize()
        began = time.monotonic()
        try:
            sig = bytes(s.sign(priv, data, mech))
            took = time.monotonic() - began
            r, t = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            key.verify(utils.encode_dss_signature(r, t), data,
                       ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        except Exception as exc:
            took = time.monotonic() - began
            with lock:
                stats["errors"].append(repr(exc))
        else:
            with lock:
                stats["signed"] += 1
        with lock:
            stats["slowest"] = max(stats["slowest"], took)
        i += 1
    s.closeSession()

threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
for t in threads:
    t.start()
time.sleep(1.0)
print("loaded", flush=True)
sys.stdin.readline()
stop.set()
for t in threads:
    t.join()
# what the application had before the restarts
info = s0.getSessionInfo()
again = s0.findObjects([(PyKCS11.CKA_LABEL, "restart-key"),
                        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)])
data = bytes(32)
sig = bytes(s0.sign(priv, data, mech))
key.verify(utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                      int.from_bytes(sig[32:], "big")),
           data, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
s1 = lib.openSession(slot, RW)
stats.update(state=int(info.state), found=[h.value() for h in again], priv=priv.value(),
             new_state=int(s1.getSessionInfo().state),
             random=len(bytes(s1.generateRandom(16))))
s1.closeSession()
s0.logout()
s0.closeSession()
print(json.dumps(stats), flush=True)
"""


@pytest.fixture
def token(tmp_path: Path) -> SoftHSM:
    import PyKCS11
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("tokR")
    env = {**os.environ, **hsm.env}
    keygen = f"""
import PyKCS11
lib = PyKCS11.PyKCS11Lib()
lib.load({str(SOFTHSM_SO)!r})
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == "tokR")
s = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
s.login({USER_PIN!r})
common = [(PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_LABEL, "restart-key"), (PyKCS11.CKA_ID, b"r1")]
s.generateKeyPair(common + [(PyKCS11.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")),
                            (PyKCS11.CKA_VERIFY, True)],
                  common + [(PyKCS11.CKA_SIGN, True), (PyKCS11.CKA_PRIVATE, True)],
                  mecha=PyKCS11.Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN))
"""
    subprocess.run([sys.executable, "-c", keygen], env=env, check=True, timeout=60)
    del PyKCS11
    return hsm


def _helpers_of_app(d: Daemon) -> set[int]:
    return set(helper_pids(d.pid))


def test_restart_and_kill_under_a_signing_load_cost_no_error(tmp_path: Path,
                                                            token: SoftHSM) -> None:
    d = Daemon(tmp_path / "p11p", {"r": one_member_group("restart", token, "tokR",
                                                         "call_timeout = 5\nhold_timeout = 10")})
    d.start()
    app = subprocess.Popen([sys.executable, "-c", APP], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **d.env})
    try:
        assert app.stdout is not None and app.stdin is not None
        line = app.stdout.readline()
        assert line.strip() == "loaded", app.stderr.read() if app.stderr else line
        before = _helpers_of_app(d)
        took = [d.restart(signal.SIGTERM)]
        time.sleep(1.5)
        took.append(d.restart(signal.SIGKILL))
        time.sleep(1.5)
        app.stdin.write("stop\n")
        app.stdin.flush()
        out, err = app.communicate(timeout=60)
    finally:
        app.kill()
        log = d.log_text()
        d.stop()
    assert app.returncode == 0, err + log[-3000:]
    stats = json.loads(out.splitlines()[-1])
    print("restart took", took, "signed", stats["signed"], "slowest", stats["slowest"])
    assert stats["errors"] == [], stats["errors"][:5]
    assert stats["signed"] > 100
    assert stats["slowest"] < 3.0, stats["slowest"]
    # the first session is still logged in (CKS_RW_USER_FUNCTIONS), its handle of the
    # key is what a search finds now, and a new session shares the login
    assert stats["state"] == 3 and stats["new_state"] == 3, stats
    assert stats["found"] == [stats["priv"]], stats
    assert stats["random"] == 16
    assert log.count("taken back (") >= 2, log[-3000:]
    assert before, "the application had no helper"
