"""Daemon restarts that applications do not notice (daemon/resume.py, README
"Operations"). Real applications through each event, every output checked:

- PyKCS11, 8 threads signing: the daemon stopped (SIGTERM) and started, killed
  (SIGKILL) and started, its group's timeouts changed and reloaded, and started as a
  newer build (one that speaks protocol versions 1..2 and a feature this client does
  not know); every signature verifies (with `cryptography`, not the token), no call
  fails, none takes 3 s; afterwards the first session is still logged in, its handles
  name the same key, a search, a new session and a random draw work;
- the same with threads that use the daemon at every call (open, log in, search, read
  attributes, sign through the daemon, close) beside the signers, through a stop and
  start: calls the stopping daemon did not begin go to the next one;
- OpenSSL's pkcs11 engine in `openssl s_server`, its TLS key on the token: handshakes in
  a loop through a stop, a kill and a reload, each verified against the certificate."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kit import (
    ASAN_CLIENT_SO,
    CLIENT_SO,
    OPENSSL_ENGINE_CNF,
    SOFTHSM_SO,
    USER_PIN,
    Daemon,
    SoftHSM,
    TlsServer,
    helper_pids,
    one_member_group,
    sanitized,
    wait_for,
)

APP = f"""
import json, os, sys, threading, time
import PyKCS11
from PyKCS11 import Mechanism
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

lib = PyKCS11.PyKCS11Lib()
lib.load(os.environ.get("CLIENT_UNDER_TEST", {str(CLIENT_SO)!r}))
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

# calls that go to the daemon every time: a session opened, a search, attributes read,
# a signature, the session closed
def control(n):
    i = 0
    while not stop.is_set():
        began = time.monotonic()
        try:
            s = lib.openSession(slot, RW)
            found = s.findObjects([(PyKCS11.CKA_LABEL, "restart-key"),
                                   (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)])
            assert [h.value() for h in found] == [priv.value()], found
            label = s.getAttributeValue(found[0], [PyKCS11.CKA_LABEL])[0]
            assert label in ("restart-key", b"restart-key"), label
            data = bytes([n, i % 256]) * 16
            sig = bytes(s.sign(priv, data, mech))
            key.verify(utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                                  int.from_bytes(sig[32:], "big")),
                       data, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            s.closeSession()
        except Exception as exc:
            with lock:
                stats["errors"].append(repr(exc))
        else:
            with lock:
                stats["control"] = stats.get("control", 0) + 1
        with lock:
            stats["slowest"] = max(stats["slowest"], time.monotonic() - began)
        i += 1

MIXED = sys.argv[1:] == ["mixed"]
threads = [threading.Thread(target=control if MIXED and n % 2 else worker, args=(n,))
           for n in range(8)]
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


def _app(d: Daemon, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    app = subprocess.Popen([sys.executable, "-c", APP, *args], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **d.env, **(env or {})})
    assert app.stdout is not None
    line = app.stdout.readline()
    assert line.strip() == "loaded", app.stderr.read() if app.stderr else line
    return app


def _finish(app: subprocess.Popen[str], d: Daemon) -> dict[str, Any]:
    assert app.stdin is not None
    app.stdin.write("stop\n")
    app.stdin.flush()
    out, err = app.communicate(timeout=60)
    assert app.returncode == 0, err + d.log_text()[-3000:]
    stats: dict[str, Any] = json.loads(out.splitlines()[-1])
    return stats


def _check_after(stats: dict[str, Any]) -> None:
    assert stats["errors"] == [], stats["errors"][:5]
    assert stats["slowest"] < 3.0, stats["slowest"]
    # the first session is still logged in (CKS_RW_USER_FUNCTIONS), its handle of the
    # key is what a search finds now, and a new session shares the login
    assert stats["state"] == 3 and stats["new_state"] == 3, stats
    assert stats["found"] == [stats["priv"]], stats
    assert stats["random"] == 16


def _reload(d: Daemon, old: str, new: str) -> None:
    """Changes the group's file and reloads (SIGHUP), as `p11p reload` does."""
    token_file = d.root / "tokens.d" / "r.toml"
    token_file.write_text(token_file.read_text().replace(old, new))
    done = d.log_text().count("reload done")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: d.log_text().count("reload done") > done, 10), d.log_text()[-2000:]
    assert "reload: group restart changed" in d.log_text()


# a newer build: it speaks protocol versions 1..2 and knows a feature this client does not
NEWER = ("import p11p.daemon.hello as h\n"
         "h.VERSIONS = (1, 2)\nh.FEATURES = h.FEATURES + ('future',)")


def test_restart_kill_reload_and_upgrade_under_a_signing_load_cost_no_error(
        tmp_path: Path, token: SoftHSM) -> None:
    d = Daemon(tmp_path / "p11p", {"r": one_member_group("restart", token, "tokR",
                                                         "call_timeout = 5\nhold_timeout = 10")})
    d.start()
    took = {}
    try:
        app = _app(d)
        took["SIGTERM"] = d.restart(signal.SIGTERM)
        time.sleep(1.2)
        took["SIGKILL"] = d.restart(signal.SIGKILL)
        time.sleep(1.2)
        _reload(d, "call_timeout = 5", "call_timeout = 7")
        time.sleep(1.2)
        took["upgrade"] = d.restart(signal.SIGTERM, preamble=NEWER)
        time.sleep(1.2)
        stats = _finish(app, d)
    finally:
        log = d.log_text()
        d.stop()
    print("restarts took", took, "signed", stats["signed"], "slowest", stats["slowest"])
    _check_after(stats)
    assert stats["signed"] > 100
    assert log.count("taken back (") >= 3, log[-3000:]


@pytest.mark.parametrize("client", ["plain", "asan"])
def test_calls_to_the_daemon_wait_for_a_restarted_one(tmp_path: Path, token: SoftHSM,
                                                      client: str) -> None:
    """Beside the signers, threads whose every call goes to the daemon; two stops and
    starts; on the plain client library and on the ASan/UBSan one."""
    d = Daemon(tmp_path / "p11p", {"r": one_member_group("restart", token, "tokR",
                                                         "call_timeout = 5\nhold_timeout = 10")})
    d.start()
    env = {} if client == "plain" else {**sanitized(),
                                        "CLIENT_UNDER_TEST": str(ASAN_CLIENT_SO)}
    try:
        app = _app(d, "mixed", env=env)
        took = [d.restart(signal.SIGTERM)]
        time.sleep(1.2)
        took.append(d.restart(signal.SIGTERM))
        time.sleep(1.2)
        stats = _finish(app, d)
    finally:
        d.stop()
    print("restarts took", took, "signed", stats["signed"], "control", stats.get("control"),
          "slowest", stats["slowest"])
    _check_after(stats)
    assert stats["signed"] > 100 and stats.get("control", 0) > 20, stats


def test_a_tls_server_s_handshakes_go_on_through_restarts(tmp_path: Path, token: SoftHSM) -> None:
    """`openssl s_server` signs each handshake with the token's key through the pkcs11
    engine; a client verifies every handshake against the certificate (made through
    the engine too) while the daemon is stopped, killed and reloaded."""
    d = Daemon(tmp_path / "p11p", {"r": one_member_group("restart", token, "tokR",
                                                         "call_timeout = 5\nhold_timeout = 10")})
    d.start()
    conf = tmp_path / "openssl.cnf"
    conf.write_text(OPENSSL_ENGINE_CNF.format(client=CLIENT_SO))
    key = f"pkcs11:token=restart;object=restart-key;type=private;pin-value={USER_PIN}"
    cert = tmp_path / "cert.pem"
    r = subprocess.run(["openssl", "req", "-new", "-x509", "-engine", "pkcs11", "-keyform",
                        "engine", "-key", key, "-subj", "/CN=p11p-restart", "-days", "1",
                        "-sha256", "-out", str(cert)], capture_output=True, text=True,
                       env={**os.environ, **d.env, "OPENSSL_CONF": str(conf)}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    server = TlsServer(key, cert, conf, d.env)
    try:
        server.start()
        time.sleep(1.0)
        d.restart(signal.SIGTERM)
        time.sleep(1.2)
        d.restart(signal.SIGKILL)
        time.sleep(1.2)
        _reload(d, "call_timeout = 5", "call_timeout = 6")
        time.sleep(1.2)
    finally:
        server.stop()
        log = d.log_text()
        d.stop()
    results = server.results
    failed = [r for r in results if not r[0]]
    print("handshakes", len(results), "slowest", max(r[1] for r in results))
    assert not failed, (failed[:3], log[-2000:])
    assert len(results) > 50
    assert max(r[1] for r in results) < 3.0


STEPS = f"""
import os, sys
import PyKCS11
lib = PyKCS11.PyKCS11Lib()
lib.load(os.environ.get("CLIENT_UNDER_TEST", {str(CLIENT_SO)!r}))
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == "restart")
s = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
s.login({USER_PIN!r})
# a login with one PIN, then another: what is kept for the next daemon follows
s.setPin({USER_PIN!r}, "87654321")
obj = s.createObject([(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA), (PyKCS11.CKA_TOKEN, False),
                      (PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_LABEL, "kept"),
                      (PyKCS11.CKA_VALUE, b"a value")])
print("made", flush=True)
sys.stdin.readline()
value = bytes(s.getAttributeValue(obj, [PyKCS11.CKA_VALUE])[0])
print(value.decode(), int(s.getSessionInfo().state), flush=True)
"""


def _status(d: Daemon) -> dict[str, Any]:
    from p11p.daemon.cli import admin_request
    result: dict[str, Any] = admin_request(d.socket.with_name(d.socket.name + ".admin"),
                                           {"cmd": "status"})
    return result


@pytest.mark.parametrize(("how", "client"), [("term", "plain"), ("kill", "plain"),
                                             ("kill", "asan")])
def test_a_restart_after_an_application_s_only_helper_died_keeps_it(
        tmp_path: Path, token: SoftHSM, how: str, client: str) -> None:
    """The application logs in and changes its PIN; its one helper is killed (its member
    fails and recovers); then the daemon is stopped, or killed, and started before the
    application's next call. A stopping daemon gives it a new helper to keep its state
    key and login (Resume.keepers); a killed one cannot, and the next daemon gets the key
    and the login (with the new PIN) from the client library's hello (hello "resume").
    Either way its session, login and private session object are there (made again from
    the recipe)."""
    d = Daemon(tmp_path / "p11p", {"r": one_member_group("restart", token, "tokR",
                                                         "hold_timeout = 10\nstandby_logins = false\n"
                                                         "[recovery]\ninterval = 0.2")})
    d.start()
    env = {} if client == "plain" else {**sanitized(),
                                        "CLIENT_UNDER_TEST": str(ASAN_CLIENT_SO)}
    app = subprocess.Popen([sys.executable, "-c", STEPS], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **d.env, **env})
    try:
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().strip() == "made", app.stderr.read() if app.stderr else ""
        (helper,) = [p for p in helper_pids(d.pid)
                     if f"pid={app.pid} member=softhsm-tokR helper pid={p}" in d.log_text()]
        os.kill(helper, signal.SIGKILL)
        assert wait_for(lambda: _status(d)["groups"][0]["members"][0]["state"] != "OK"
                        or "helper killed" in d.log_text(), 10)
        assert wait_for(lambda: _status(d)["groups"][0]["members"][0]["state"] == "OK", 20)
        d.restart(signal.SIGTERM if how == "term" else signal.SIGKILL)
        app.stdin.write("go\n")
        app.stdin.flush()
        out, err = app.communicate(timeout=60)
        # the state directory: 0700, its files 0600, no PIN in any of them
        state = d.socket.parent / "state"
        files = list(state.iterdir())
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert {f.name for f in files} >= {"groups.state"}, files
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
            data = f.read_bytes()
            assert b"87654321" not in data and USER_PIN.encode() not in data, f
    finally:
        app.kill()
        log = d.log_text()
        d.stop()
    assert app.returncode == 0, err + log[-3000:]
    assert out.split() == ["a", "value", "3"], out  # CKS_RW_USER_FUNCTIONS
    if how == "term":
        assert "taken back (1 sessions" in log, log[-3000:]
    else:
        assert "taken back with the key its library kept (1 sessions" in log, log[-3000:]
        assert "logged in again with its library's login" in log, log[-3000:]
    assert "87654321" not in log and USER_PIN not in log


def test_a_state_directory_found_open_is_made_0700(tmp_path: Path, token: SoftHSM) -> None:
    """An operator made the state directory with a plain mkdir (0755): the first state
    file write makes it 0700 and says so."""
    d = Daemon(tmp_path / "p11p", {"r": one_member_group("restart", token, "tokR")})
    state = d.socket.parent / "state"
    state.mkdir(parents=True)
    os.chmod(state, 0o755)
    d.start()
    try:
        app = subprocess.run([sys.executable, "-c", f"""
import PyKCS11
lib = PyKCS11.PyKCS11Lib()
lib.load({str(CLIENT_SO)!r})
s = lib.openSession(lib.getSlotList(tokenPresent=True)[0])
s.login({USER_PIN!r})
s.logout()
"""], env={**os.environ, **d.env}, capture_output=True, text=True, timeout=60)
        assert app.returncode == 0, app.stderr
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert "state directory" in d.log_text() and "was mode 755: made 0700" in d.log_text()
    finally:
        d.stop()


def test_a_restarted_daemon_removes_the_tmp_files_a_kill_left(tmp_path: Path,
                                                              token: SoftHSM) -> None:
    """A daemon killed between a state file's swap and the unlink of the old one leaves
    a .tmp (resume._write): the next daemon removes it, and it takes no .state for it."""
    d = Daemon(tmp_path / "p11p", {"r": one_member_group("restart", token, "tokR")})
    state = d.socket.parent / "state"
    state.mkdir(parents=True, mode=0o700)
    (state / "4242-0011.tmp").write_bytes(b"the old state of a context")
    d.start()
    try:
        assert wait_for(lambda: not (state / "4242-0011.tmp").exists(), 10)
        assert "4242-0011" not in d.log_text()
    finally:
        d.stop()
