"""`p11p reload` of a changed group under a signing load (issue 14): settings apply in
place, a member removed hands its sessions to the other (failover with replay), a member
added comes into service; the application's sessions and login go on through all of it,
every signature verifies, none is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hakit import HAGroup
from kit import CLIENT_SO, SOFTHSM_SO, USER_PIN, SoftHSM, TlsServer, wait_for

HERE = Path(__file__).resolve().parent
THREADS, SECONDS = 4, 8.0


def reload(group: HAGroup, text: str) -> None:
    (group.daemon.root / "tokens.d" / "ha.toml").write_text(text)
    r = subprocess.run([sys.executable, "-m", "p11p.daemon", "reload", "--config",
                        str(group.daemon.config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def without(text: str, member: str) -> str:
    head, *blocks = text.split("\n[[member]]")
    return head + "".join("\n[[member]]" + b for b in blocks if f'name = "{member}"' not in b)


def served(group: HAGroup) -> dict[str, int]:
    (g,) = group.status()["groups"]
    return {m["name"]: m["calls_served"] for m in g["members"]}


def test_reload_under_load_keeps_every_session(ha_factory: Any, ha_keys: Path) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    first = (group.daemon.root / "tokens.d" / "ha.toml").read_text()
    load = subprocess.Popen(
        [sys.executable, str(HERE / "load_app.py"), str(CLIENT_SO), "ha", USER_PIN,
         str(THREADS), str(SECONDS), str(ha_keys)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **group.daemon.env})
    try:
        assert wait_for(lambda: served(group)["hsmA"] > 200, 15)
        # settings: timeouts, policy, weights, recovery, probes
        changed = (first.replace("call_timeout = 1.5", "call_timeout = 2.5")
                   .replace("hold_timeout = 2", "hold_timeout = 3")
                   .replace('policy = "failover"', 'policy = "balance"')
                   .replace("interval = 0.2", "interval = 0.3")
                   .replace('name = "hsmB"', 'name = "hsmB"\nweight = 3'))
        changed = changed.replace("[recovery]", "[health]\ninterval = 1\n\n[recovery]", 1)
        reload(group, changed)
        log = group.daemon.log_text()
        for what in ("call_timeout", "hold_timeout", "policy", "recovery", "health",
                     "hsmB.weight"):
            assert what in log.split("reload: group ha changed")[-1].splitlines()[0], what
        assert group.status()["groups"][0]["policy"] == "balance"  # new sessions spread
        # hsmA removed: its sessions fail over to hsmB, with login and replay
        reload(group, without(changed, "hsmA"))
        assert [m["name"] for m in group.status()["groups"][0]["members"]] == ["hsmB"]
        time.sleep(1.0)
        # hsmA added again: it comes into service and takes calls
        reload(group, changed)
        group.wait_state("hsmA", "OK")
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, err
    result = json.loads(out)
    print(f"reload under load: {result}")
    assert result["errors"] == 0, result
    assert result["ops"] > 100, result
    assert result["slowest"] < 3.0, result
    log = group.daemon.log_text()
    assert "member removed: group=ha member=hsmA" in log
    # the added member serves: with hsmB drained, a new application runs on it alone
    r = subprocess.run([sys.executable, "-m", "p11p.daemon", "member", "drain", "ha", "hsmB",
                        "--config", str(group.daemon.config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mark = served(group)["hsmA"]
    again = subprocess.run(
        [sys.executable, str(HERE / "load_app.py"), str(CLIENT_SO), "ha", USER_PIN, "2", "1.5",
         str(ha_keys)], capture_output=True, text=True, timeout=60,
        env={**os.environ, **group.daemon.env})
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["errors"] == 0 and second["ops"] > 10, second
    assert served(group)["hsmA"] >= mark + second["ops"]
    assert "CKR_SESSION_HANDLE_INVALID" not in log.split("reload: group ha changed")[1]


NEWER = ("import p11p.daemon.hello as h\n"
         "h.VERSIONS = (1, 2)\nh.FEATURES = h.FEATURES + ('future',)")


IMPORT = """
import sys
import PyKCS11 as P
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
module, label, pem = sys.argv[1:4]
key = serialization.load_pem_private_key(open(pem, "rb").read(), None)
point = key.public_key().public_bytes(serialization.Encoding.X962,
                                      serialization.PublicFormat.UncompressedPoint)
lib = P.PyKCS11Lib()
lib.load(module)
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == label)
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
s.login("1234")
common = [(P.CKA_TOKEN, True), (P.CKA_LABEL, "tls-key"), (P.CKA_ID, b"\\x42"),
          (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107"))]
s.createObject(common + [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_PRIVATE, True),
                         (P.CKA_SIGN, True), (P.CKA_SENSITIVE, True),
                         (P.CKA_VALUE, key.private_numbers().private_value.to_bytes(32, "big"))])
s.createObject(common + [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_VERIFY, True),
                         (P.CKA_EC_POINT, bytes([4, len(point)]) + point)])
"""


def _tls_tokens(root: Path) -> tuple[SoftHSM, Path]:
    """Two tokens holding the same EC key pair (imported, as an operator replicates
    keys), and a self-signed certificate for it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    pem = root / "key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    hsm = SoftHSM(root / "hsm")
    for label in ("tlsA", "tlsB"):
        hsm.init_token(label)
        subprocess.run([sys.executable, "-c", IMPORT, str(SOFTHSM_SO), label, str(pem)],
                       env={**os.environ, **hsm.env}, check=True, timeout=60)
    pem.unlink()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p11p-ha")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    out = root / "cert.pem"
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return hsm, out


def test_a_tls_server_goes_on_through_reloads_member_changes_and_an_upgrade(
        tmp_path: Path) -> None:
    """`openssl s_server` with its TLS key on the group (the pkcs11 engine through p11p):
    a client's handshakes in a loop, each verified against the certificate, through a
    reload of settings, a member removed and added again, and the daemon replaced by a
    newer build (SIGTERM, started with versions 1..2 and a feature this client does
    not know). No handshake fails or takes 3 s."""
    hsm, cert = _tls_tokens(tmp_path)
    group = HAGroup(tmp_path / "g", hsm, "failover", ["tlsA", "tlsB"])
    group.daemon.start()
    first = (group.daemon.root / "tokens.d" / "ha.toml").read_text()
    key = f"pkcs11:token=ha;object=tls-key;type=private;pin-value={USER_PIN}"
    server = TlsServer(key, cert, tmp_path / "openssl.cnf", group.daemon.env)
    try:
        server.start()
        time.sleep(1.0)
        changed = (first.replace("call_timeout = 1.5", "call_timeout = 2.5")
                   .replace('policy = "failover"', 'policy = "balance"'))
        reload(group, changed)
        time.sleep(1.0)
        reload(group, without(changed, "tlsA"))
        time.sleep(1.0)
        reload(group, changed)
        group.wait_state("tlsA", "OK")
        time.sleep(1.0)
        group.daemon.restart(signal.SIGTERM, preamble=NEWER)
        time.sleep(1.5)
    finally:
        server.stop()
        log = group.daemon.log_text()
        group.daemon.stop()
    results = server.results
    failed = [r for r in results if not r[0]]
    print(f"handshakes {len(results)}, slowest {max(r[1] for r in results):.3f} s")
    assert not failed, (len(failed), failed[:3], log[-2000:])
    assert len(results) > 50
    assert max(r[1] for r in results) < 3.0
    assert "member removed: group=ha member=tlsA" in log and "taken back (" in log
