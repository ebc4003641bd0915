"""Helper processes and member hangs (DESIGN invariants 2 and 4): a hung member costs a
call about call_timeout, whichever plane carries it; a member that fails on and off under
load leaves no helper behind once its application has ended (the warm pool only)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hakit import HERE, HAGroup, WorkloadApp
from kit import SOFTHSM_SO, USER_PIN, SoftHSM, helper_pids, wait_for, zombies
from test_direct_path import _run

FLAPS = [
    "* error rv=CKR_DEVICE_ERROR\n",
    "C_Sign crash\n",
    "C_GenerateRandom error rv=CKR_DEVICE_ERROR\n",
    "C_SignInit crash\n",
    "* error rv=CKR_TOKEN_NOT_PRESENT\n",
    "C_OpenSession crash\n",
]


def _flap(group: HAGroup, token: str, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        group.set_rules(token, FLAPS[i % len(FLAPS)])
        time.sleep(0.35)
        group.set_rules(token, "")
        time.sleep(0.35)
        i += 1


def _pool(group: HAGroup, size: int) -> bool:
    return len(helper_pids(group.daemon.pid)) == size


@pytest.fixture
def own_group(tmp_path: Path, ha_keys: Path) -> Iterator[HAGroup]:
    """A group on tokens of its own: a module that crashes while SoftHSM2 rewrites a
    token's file (its login does) leaves that file empty, and the token gone, for
    whoever uses it next; the session's shared tokens must not be the ones."""
    hsm = SoftHSM(tmp_path / "softhsm")
    for label in ("hsmA", "hsmB"):
        hsm.init_token(label)
        subprocess.run([sys.executable, str(HERE / "import_keys.py"), str(SOFTHSM_SO), label,
                        USER_PIN, str(ha_keys)], env={**os.environ, **hsm.env}, check=True)
    group = HAGroup(tmp_path / "g", hsm, "failover", ["hsmA", "hsmB"])
    saved = {f: f.read_bytes() for f in hsm.tokens.glob("*/token.object")}
    group.repair = lambda: _repair(saved)  # type: ignore[attr-defined]
    group.daemon.start()
    yield group
    group.daemon.stop()


def _repair(saved: dict[Path, bytes]) -> None:
    """A token file a crash left empty is put back (an HSM does not lose its token when
    a client of it crashes; SoftHSM2's file store does)."""
    for path, data in saved.items():
        if path.stat().st_size == 0:
            path.write_bytes(data)


@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_flapping_member_leaves_no_helper_behind(own_group: HAGroup, ha_keys: Path,
                                                   direct: str) -> None:
    """hsmA fails and comes back every 0.7 s (error codes, crashes) while an application
    signs on four threads; twice. After each run, once the application has ended and the
    member is back, the daemon runs its warm pool only: one helper per member."""
    group = own_group
    assert wait_for(lambda: _pool(group, 2), 10), helper_pids(group.daemon.pid)
    baseline = len(helper_pids(group.daemon.pid))
    counts = []
    for _ in range(2):
        result: dict[str, Any] = {}
        stop = threading.Event()
        flapper = threading.Thread(target=_flap, args=(group, "hsmA", stop))
        runner = _background(group, ha_keys, 4, 4.5, direct, result)
        time.sleep(0.5)
        flapper.start()
        runner.join()
        stop.set()
        flapper.join()
        group.set_rules("hsmA", "")
        group.repair()  # type: ignore[attr-defined]
        assert result.get("ops", 0) > 20, result
        group.wait_state("hsmA", "OK", timeout=15)
        wait_for(lambda: _pool(group, baseline), 15)
        counts.append(len(helper_pids(group.daemon.pid)))
        assert wait_for(lambda: not zombies(group.daemon.pid), 5), zombies(group.daemon.pid)
        print(f"direct={direct}: helpers after a flapping run: {counts[-1]} (baseline {baseline})")
    assert counts == [baseline, baseline], (counts, baseline, _whence(group))


def _whence(group: HAGroup) -> list[str]:
    """What the daemon's log says of the helpers that run now (for a failure message)."""
    text = group.daemon.log_text().splitlines()
    return [line for pid in helper_pids(group.daemon.pid) for line in text
            if f"pid={pid}" in line or f"pid {pid}" in line][:40]


def _background(group: HAGroup, keys: Path, threads: int, seconds: float, direct: str,
                result: dict[str, Any]) -> threading.Thread:
    runner = threading.Thread(target=lambda: result.update(
        _run(group, keys, threads, seconds, env={"P11P_DIRECT": direct})))
    runner.start()
    return runner


def _set_timeout(group: HAGroup, direct: str) -> None:
    """hakit's groups have call_timeout 1.5: this test's numbers are for 2 s. With
    `direct` "0" the group's direct path is off too (direct_calls = false)."""
    path = group.daemon.config.parent / "tokens.d" / "ha.toml"
    off = "\ndirect_calls = false" if direct == "0" else ""
    text = path.read_text().replace("call_timeout = 1.5", "call_timeout = 2" + off)
    path.write_text(text)
    group.daemon.stop()
    group.daemon.start()


@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_hung_member_costs_a_call_at_most_call_timeout(ha_factory: Any, ha_keys: Path,
                                                         direct: str) -> None:
    """call_timeout = 2, hold_timeout = 2: every function of hsmA hangs (a new helper's
    C_Initialize too). The signatures go on on hsmB, no call taking over call_timeout,
    never the 30 s of a helper start; direct path on and off. Then hsmB hangs too: the
    call fails with CKR_DEVICE_ERROR within hold_timeout + call_timeout."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    _set_timeout(group, direct)
    try:
        result: dict[str, Any] = {}
        runner = _background(group, ha_keys, 2, 4.5, direct, result)
        time.sleep(1.5)
        group.set_rules("hsmA", "* hang\n")
        runner.join()
        assert result["errors"] == 0 and result["ops"] > 20, result
        print(f"direct={direct}: one member hung: slowest call {result['slowest']:.2f} s")
        assert result["slowest"] <= 2.0, result
        assert group.member("hsmA")["state"] in ("FAILED", "RECOVERING"), group.member("hsmA")
        app = WorkloadApp(group.daemon, ha_keys)
        try:
            assert app.send("begin ecdsa") == "ready"
            group.set_rules("hsmB", "* hang\n")
            start = time.monotonic()
            reply = app.send("finish")
            took = time.monotonic() - start
            print(f"direct={direct}: both members hung: {reply} after {took:.2f} s")
            assert reply.startswith("error") and "0x30" in reply, reply  # CKR_DEVICE_ERROR
            assert took < 2.0 + 2.0 + 1.0, took  # hold_timeout + call_timeout (+ slack)
        finally:
            for t in ("hsmA", "hsmB"):
                group.set_rules(t, "")
            app.close()
    finally:
        for t in ("hsmA", "hsmB"):
            group.set_rules(t, "")


def test_a_helper_start_on_a_hung_member_draws_from_the_call(ha_factory: Any,
                                                             ha_keys: Path) -> None:
    """No warm pool (helper_pool = 0): an application that starts while every function
    of hsmA hangs needs a new helper there, whose C_Initialize hangs. The start draws
    from the call's deadline (call_timeout = 1.5), fails hsmA, and the application is
    served by hsmB: it is up within call_timeout and a little, not a 30 s start."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"], daemon_extra="helper_pool = 0\n")
    try:
        WorkloadApp(group.daemon, ha_keys).close()  # takes the probe's helper, the last warm one
        group.set_rules("hsmA", "* hang\n")
        start = time.monotonic()
        app = WorkloadApp(group.daemon, ha_keys)
        try:
            took = time.monotonic() - start
            print(f"application up in {took:.2f} s with a hung member and no warm helper")
            assert took < 1.5 + 1.5, took
            assert app.send("begin ecdsa") == "ready"
            assert app.send("finish").startswith("ok")
        finally:
            group.set_rules("hsmA", "")
            app.close()
        assert group.member("hsmA")["state"] != "OK" or "helper did not start" in \
            group.daemon.log_text()
    finally:
        group.set_rules("hsmA", "")


def test_a_helper_serves_the_next_application_clean(ha_factory: Any, ha_keys: Path) -> None:
    """An application's helpers, once it has ended, serve the next application (no
    fork, no module start: HelperPool.recycle) when clean: the login, the session objects
    and the data plane's connections of the one before are gone. The next application
    is not logged in, sees neither the private keys nor the other's session object, and
    signs (on the data plane) once it logs in; signatures verify."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from hakit import PyApp
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    public = serialization.load_pem_public_key(
        __import__("json").loads(ha_keys.read_text())["ec_public"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    setup = f"""
import hashlib
slot = lib.getSlotList(tokenPresent=True)[0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
def privs():
    return len(s.findObjects([(P.CKA_CLASS, P.CKO_PRIVATE_KEY)]))
def sign():
    (key,) = s.findObjects([(P.CKA_LABEL, "ha-ec"), (P.CKA_CLASS, P.CKO_PRIVATE_KEY)])
    return bytes(s.sign(key, hashlib.sha256(b"recycled").digest(),
                        P.Mechanism(P.CKM_ECDSA))).hex()
PIN = "{USER_PIN}"
"""
    first = PyApp(group.daemon)
    try:
        first.run(setup + "s.login(PIN)")
        first.run('s.createObject([(P.CKA_CLASS, P.CKO_DATA), (P.CKA_TOKEN, False), '
                  '(P.CKA_PRIVATE, False), (P.CKA_LABEL, "first-app"), (P.CKA_VALUE, b"x")])')
        assert first.run("_ = privs()") != "0"
        first.run("_ = sign()")
        helper = group.app_helper(first.proc.pid, "hsmA")
    finally:
        first.close()
    # its helper on hsmA, and the one on hsmB where it was logged in in the background
    assert wait_for(lambda: re.search(r"\b[12] kept for other applications",
                                      group.daemon.log_text()) is not None, 10)
    second = PyApp(group.daemon)
    try:
        second.run(setup)
        assert group.app_helper(second.proc.pid, "hsmA") == helper  # the same process
        assert second.run("_ = s.getSessionInfo().state") == "2"  # CKS_RW_PUBLIC_SESSION
        assert second.run("_ = privs()") == "0"
        assert second.run('_ = len(s.findObjects([(P.CKA_LABEL, "first-app")]))') == "0"
        second.run("s.login(PIN)")
        signature = bytes.fromhex(second.run("_ = sign()").strip("'"))
        r, s_ = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
        public.verify(encode_dss_signature(r, s_), b"recycled", ec.ECDSA(hashes.SHA256()))
    finally:
        second.close()
