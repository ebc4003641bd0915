"""The audit log (`[daemon] audit_log`, daemon/audit.py): an application's logins (a
wrong PIN too), an object it creates and destroys, its key uses counted when it ends,
and a member's drain and enable, each a JSON line naming objects by identity; neither
the PIN nor the key's value anywhere in the file. Bad audit settings are configuration
errors that name file:line:key."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from kit import CLIENT_SO, Daemon, SoftHSM, one_member_group, wait_for

PIN, WRONG = "Pin-Audit-5521q", "Pin-Wrong-8812w"
KEY_VALUE = bytes.fromhex("5ec7e7a1d1f0c0de" * 4)  # the HMAC key's CKA_VALUE
MEMBER = "softhsm-auditTok"

APP = f"""
import os, PyKCS11 as P
lib = P.PyKCS11Lib(); lib.load({str(CLIENT_SO)!r})
slot = lib.getSlotList(tokenPresent=True)[0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
try:
    s.login({WRONG!r})
except P.PyKCS11Error as e:
    assert e.value == P.CKR_PIN_INCORRECT, e
s.login({PIN!r})
key = s.createObject([
    (P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_GENERIC_SECRET),
    (P.CKA_TOKEN, True), (P.CKA_PRIVATE, True), (P.CKA_SIGN, True),
    (P.CKA_LABEL, "audit-hmac"), (P.CKA_ID, (0xa0, 0xd1)),
    (P.CKA_VALUE, {tuple(KEY_VALUE)!r})])
macs = [bytes(s.sign(key, b"message %d" % i, P.Mechanism(P.CKM_SHA256_HMAC, None)))
        for i in range(3)]
s.destroyObject(key)
s.logout()
s.closeSession()
print(os.getpid())
"""


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _events(path: Path, event: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in _records(path)
            if r["event"] == event and all(r.get(k) == v for k, v in match.items())]


def _member(d: Daemon, action: str) -> None:
    r = subprocess.run([sys.executable, "-m", "p11p.daemon", "member", action, "audited",
                        MEMBER, "--config", str(d.config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_audit_log_records_logins_objects_key_use_and_members(tmp_path: Path) -> None:
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("auditTok", pin=PIN)
    # every use of the key passes the daemon (the direct path's signatures would not)
    d = Daemon(tmp_path / "p11p",
               {"a": one_member_group("audited", hsm, "auditTok", extra="direct_calls = false")},
               daemon_extra='audit_log = "audit.jsonl"\naudit_interval = 60\n')
    audit = d.root / "audit.jsonl"
    d.start()
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(APP)], capture_output=True,
                           text=True, env={**os.environ, **d.env}, timeout=60)
        assert r.returncode == 0, r.stderr
        pid = int(r.stdout.split()[-1])
        # counted in memory (audit_interval is 60 s), written when the application ends
        assert wait_for(lambda: _events(audit, "key_use"), timeout=15), _records(audit)
        _member(d, "drain")
        _member(d, "enable")
        assert wait_for(lambda: _events(audit, "member_state", new="OK", old="DRAINING"),
                        timeout=10), _records(audit)
    finally:
        d.stop()

    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    records = _records(audit)
    for rec in records:
        assert rec["event"]
        assert datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0

    logins = _events(audit, "login")
    assert [(x["user_type"], x["rv"]) for x in logins] == [
        ("CKU_USER", "CKR_PIN_INCORRECT"), ("CKU_USER", "CKR_OK")]
    app = logins[0]["app"]
    assert app["pid"] == pid and app["uid"] == os.getuid() and app["exe"] == os.path.realpath(sys.executable)
    assert [x["rv"] for x in _events(audit, "logout")] == ["CKR_OK"]

    identity = {"class": "CKO_SECRET_KEY", "label": "audit-hmac", "id": "a0d1",
                "key_type": "CKK_GENERIC_SECRET"}
    created = _events(audit, "object_created", object=identity)
    assert len(created) == 1, records
    assert created[0]["token"] is True and created[0]["members"] == [MEMBER]
    assert created[0]["function"] == "C_CreateObject" and created[0]["app"]["pid"] == pid
    destroyed = _events(audit, "object_destroyed", object=identity)
    assert len(destroyed) == 1 and destroyed[0]["members"] == [MEMBER], records

    uses = _events(audit, "key_use", key=identity)
    assert [(u["op"], u["mechanism"], u["count"], u["path"]) for u in uses] == [
        ("sign", "CKM_SHA256_HMAC", 3, "daemon")], records
    assert uses[0]["app"]["pid"] == pid and uses[0]["group"] == "audited"

    states = [(x["old"], x["new"]) for x in _events(audit, "member_state", member=MEMBER)]
    assert ("OK", "DRAINING") in states and ("DRAINING", "OK") in states
    assert all(x["group"] == "audited" for x in _events(audit, "member_state"))

    raw = audit.read_bytes()
    for secret in (PIN, WRONG):
        assert secret.encode() not in raw
    for form in (KEY_VALUE, KEY_VALUE.hex().encode(), KEY_VALUE.hex().upper().encode(),
                 base64.b64encode(KEY_VALUE)):
        assert form not in raw
    assert PIN not in d.log_text()


def _check_config(d: Daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p11p.daemon", "check-config", str(d.config)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("value, message", [
    ('"soon"', "expected int or float"), ("0", "must be at least"), ("-5", "must be at least")])
def test_bad_audit_interval_names_file_line_key(tmp_path: Path, value: str, message: str) -> None:
    hsm = SoftHSM(tmp_path / "hsm")
    d = Daemon(tmp_path / "p11p", {"a": one_member_group("audited", hsm, "auditTok")},
               daemon_extra=f'audit_log = "audit.jsonl"\naudit_interval = {value}\n')
    r = _check_config(d)
    assert r.returncode == 1
    # [daemon] is line 1, socket 2, tokens_dir 3, audit_log 4, audit_interval 5
    assert f"{d.config}:5: daemon.audit_interval: {message}" in r.stderr, r.stderr


def test_unwritable_audit_log_is_a_config_error(tmp_path: Path) -> None:
    hsm = SoftHSM(tmp_path / "hsm")
    d = Daemon(tmp_path / "p11p", {"a": one_member_group("audited", hsm, "auditTok")},
               daemon_extra='audit_log = "missing/audit.jsonl"\n')
    r = _check_config(d)
    assert r.returncode == 1
    assert f"{d.config}:4: daemon.audit_log: " in r.stderr and "no such directory" in r.stderr
    with pytest.raises(RuntimeError, match="daemon.audit_log"):  # and the daemon does not start
        d.start(timeout=10)


DIRECT_APP = f"""
import PyKCS11 as P
lib = P.PyKCS11Lib(); lib.load({str(CLIENT_SO)!r})
slot = lib.getSlotList(tokenPresent=True)[0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
s.login({PIN!r})
key = s.createObject([
    (P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_GENERIC_SECRET),
    (P.CKA_TOKEN, False), (P.CKA_SIGN, True), (P.CKA_LABEL, "audit-direct"),
    (P.CKA_VALUE, {tuple(KEY_VALUE)!r})])
for i in range(8):
    s.sign(key, b"message %d" % i, P.Mechanism(P.CKM_SHA256_HMAC, None))
"""


def test_direct_path_key_use_is_marked(tmp_path: Path) -> None:
    """With an audit log the direct path is off (direct_calls stays true in the file):
    every signature passes the daemon and is counted."""
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("auditTok", pin=PIN)
    d = Daemon(tmp_path / "p11p", {"a": one_member_group("audited", hsm, "auditTok")},
               daemon_extra='audit_log = "audit.jsonl"\n')
    audit = d.root / "audit.jsonl"
    d.start()
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(DIRECT_APP)],
                           capture_output=True, text=True, env={**os.environ, **d.env}, timeout=60)
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: _events(audit, "key_use"), timeout=15), _records(audit)
    finally:
        d.stop()
    uses = [u for u in _events(audit, "key_use") if u["key"]["label"] == "audit-direct"]
    assert all(u["token"] is False and u["op"] == "sign" for u in uses), uses
    assert sum(u["count"] for u in uses if u["path"] == "daemon") == 8, uses
    assert not [u for u in uses if u["path"] == "direct"], uses
    created = _events(audit, "object_created")
    assert [c["object"]["label"] for c in created] == ["audit-direct"] and created[0]["token"] is False
    assert KEY_VALUE.hex().encode() not in audit.read_bytes() and KEY_VALUE not in audit.read_bytes()


def test_a_log_that_cannot_be_written_costs_one_error_line(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from p11p.daemon.audit import AuditLog, _FileSink

    async def run() -> None:
        sink = _FileSink(str(tmp_path / "audit.jsonl"))
        log = AuditLog(sink, 60.0)
        log.start()
        log.emit("test", n=1)
        log.flush()
        os.close(sink.fd)
        sink.fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail (EBADF)
        for n in range(3):
            log.emit("test", n=n)
            log.flush()
        log.close()

    asyncio.run(run())
    errors = [r for r in caplog.records if r.name == "p11p.audit" and r.levelname == "ERROR"]
    assert len(errors) == 1, caplog.records
    assert [json.loads(x)["n"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()] == [1]
