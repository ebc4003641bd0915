"""HA behaviour beyond the matrix: session-lost codes on one member, both members down
(hold, then CKR_DEVICE_ERROR; recovery within one interval, states seen in status),
balanced load, draining under load, token writes under write_policy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hakit import HERE, HAGroup, WorkloadApp
from kit import CLIENT_SO, SOFTHSM_SO, USER_PIN, wait_for
from p11p.protocol.constants import CKR


@pytest.mark.parametrize("rule", [
    "C_Sign error rv=CKR_SESSION_HANDLE_INVALID count=1",
    "C_Sign error rv=CKR_SESSION_CLOSED count=1",
    "C_Sign error rv=CKR_USER_NOT_LOGGED_IN count=1",
    "C_SignInit error rv=CKR_OBJECT_HANDLE_INVALID count=1",
    "C_Sign close-sessions",
])
def test_session_lost_is_invisible_on_one_member(ha_factory: Any, ha_keys: Path, rule: str) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA"])
    app = WorkloadApp(group.daemon, ha_keys)
    try:
        # the fault hits the first matching call: C_SignInit in "begin", C_Sign in "finish"
        group.set_rules("hsmA", rule + "\n")
        assert app.send("begin ecdsa") == "ready"
        assert app.send("finish").startswith("ok")
        # and the application's login survived: a private object is still readable
        group.set_rules("hsmA", "")
        assert app.send("begin private_attribute") == "ready"
        assert app.send("finish").startswith("ok")
    finally:
        app.close()
    log = group.daemon.log_text()
    if "OBJECT_HANDLE_INVALID" in rule:  # the object is asked about; the session stays
        assert "object handle refused:" in log and "session lost:" not in log
    else:
        assert "session lost:" in log
    assert rule.split()[0] in (group.faultlog.read_text() if group.faultlog.exists() else "")
    assert group.member("hsmA")["state"] == "OK"  # a lost session is not a failed member


def _poll_states(group: HAGroup, name: str, seen: list[str], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            m = group.member(name)
            label = m["state"] + (f" {m['attempt']}/{m['attempts']}" if m["state"] == "RECOVERING" else "")
            if not seen or seen[-1] != label:
                seen.append(label)
        except (OSError, SystemExit):
            pass
        time.sleep(0.01)


def test_both_members_down_hold_then_fail_then_recover(ha_factory: Any, ha_keys: Path) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    seen: list[str] = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll_states, args=(group, "hsmB", seen, stop))
    poller.start()
    app = WorkloadApp(group.daemon, ha_keys)
    try:
        assert app.send("begin ecdsa") == "ready"
        for t in ("hsmA", "hsmB"):
            group.set_rules(t, "* error rv=CKR_DEVICE_ERROR\n")
        start = time.monotonic()
        reply = app.send("finish")
        held = time.monotonic() - start
        assert reply.startswith("error") and "0x30" in reply, reply  # CKR_DEVICE_ERROR
        assert 2.0 <= held < 6.0, held  # hold_timeout = 2
        group.set_rules("hsmB", "")
        healed = time.monotonic()
        back = group.wait_state("hsmB", "OK")
        assert time.monotonic() - healed <= 0.2 + 1.0  # one recovery.interval (+ a probe)
        assert back >= 0
        assert app.send("begin ecdsa") == "ready"
        assert app.send("finish").startswith("ok")
    finally:
        stop.set()
        poller.join()
        app.close()
        for t in ("hsmA", "hsmB"):
            group.set_rules(t, "")
    states = [s.split()[0] for s in seen]
    assert states[0] == "OK" and states[-1] == "OK"
    assert "FAILED" in states and "RECOVERING" in states
    assert states.index("FAILED") < states.index("RECOVERING") < len(states) - 1
    log = group.daemon.log_text()
    assert "group out of service: group=ha" in log and "group restored: group=ha" in log
    metrics = group.prometheus()
    assert re.search(r'p11p_member_errors_total\{group="ha",member="hsmA",rv="CKR_DEVICE_ERROR"\} [1-9]', metrics)
    assert re.search(r'p11p_group_recoveries_total\{group="ha"\} [1-9]', metrics)
    assert re.search(r'p11p_member_call_seconds_count\{group="ha",member="hsmB"\} [1-9]', metrics)
    assert 'p11p_member_up{group="ha",member="hsmB",state="OK"} 1' in metrics


def _load(group: HAGroup, threads: int, seconds: float, until: Path | None = None
          ) -> dict[str, Any]:
    extra = {"LOAD_UNTIL": str(until)} if until is not None else {}
    r = subprocess.run([sys.executable, str(HERE / "load_app.py"), str(CLIENT_SO), "ha", USER_PIN,
                        str(threads), str(seconds)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **group.daemon.env, **extra})
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


SLOW_HSM = "* delay ms=2\nconcurrency 2\n"


def test_balance_spreads_load_and_scales(ha_factory: Any) -> None:
    one: HAGroup = ha_factory("balance", ["hsmA"], rules={"hsmA": SLOW_HSM})
    single = _load(one, 16, 4.0)
    one.daemon.stop()
    two: HAGroup = ha_factory("balance", ["hsmA", "hsmB"], rules={"hsmA": SLOW_HSM, "hsmB": SLOW_HSM})
    before = {m: two.member(m)["calls_served"] for m in ("hsmA", "hsmB")}
    double = _load(two, 16, 4.0)
    served = {m: two.member(m)["calls_served"] - before[m] for m in ("hsmA", "hsmB")}
    assert single["errors"] == 0 and double["errors"] == 0, (single, double)
    share = served["hsmA"] / (served["hsmA"] + served["hsmB"])
    assert 0.4 <= share <= 0.6, served
    ratio = (double["ops"] / double["elapsed"]) / (single["ops"] / single["elapsed"])
    print(f"balance: one member {single['ops'] / single['elapsed']:.0f} ops/s, two "
          f"{double['ops'] / double['elapsed']:.0f} ops/s, ratio {ratio:.2f}, split {served}")
    # Two members serve in parallel: clearly more than one (the speed target itself,
    # 2 members >= 1.8x one, is measured by `make bench`, not in a timed test).
    assert ratio >= 1.3, (ratio, single, double)


def test_drain_under_load(ha_factory: Any, tmp_path: Path) -> None:
    # no fault here: a call_timeout that a loaded machine's slow signature cannot pass
    # (16 threads; `make test` runs two halves at once), so a hang is never mistaken.
    # The load runs until the checks are done (a loaded machine's commands take seconds).
    group: HAGroup = ha_factory("balance", ["hsmA", "hsmB"], call_timeout=5.0)
    result: dict[str, Any] = {}
    done = tmp_path / "load-done"
    runner = threading.Thread(target=lambda: result.update(_load(group, 16, 60.0, done)))
    runner.start()
    try:
        assert wait_for(lambda: group.member("hsmA")["sessions"] > 0, 20.0)
        r = subprocess.run([sys.executable, "-m", "p11p.daemon", "member", "drain", "ha", "hsmA",
                            "--config", str(group.daemon.config)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "DRAINING" in r.stdout
        time.sleep(1.0)  # busy sessions leave at their next operation boundary
        a = group.member("hsmA")
        assert a["state"] == "DRAINING" and a["sessions"] == 0, a  # while the load goes on
        served_a = a["calls_served"]
        served_b = group.member("hsmB")["calls_served"]
        time.sleep(1.0)
        assert group.member("hsmA")["calls_served"] == served_a  # nothing new goes there
        assert group.member("hsmB")["calls_served"] > served_b + 100  # the load goes on
        assert runner.is_alive()  # it did, until now
    finally:
        done.touch()
        runner.join()
    assert result["errors"] == 0, result
    r = subprocess.run([sys.executable, "-m", "p11p.daemon", "member", "enable", "ha", "hsmA",
                        "--config", str(group.daemon.config)], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("policy, expect", [("primary", "CKR_OK"), ("refuse", "CKR_TOKEN_WRITE_PROTECTED")])
def test_token_writes_follow_write_policy(ha_factory: Any, ha_tokens: Any, policy: str,
                                          expect: str) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"], extra=f'write_policy = "{policy}"')
    code = f"""
import sys, ctypes as C
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from ckraw import Module, CK_ULONG, CKA, CKM, mechanism, template
m = Module({str(CLIENT_SO)!r}); assert m.initialize() == 0
slot = m.slots()[0]; h = m.open_session(slot); assert m.login(h, b"{USER_PIN}") == 0
t, n, keep = template((CKA["CKA_CLASS"], 4), (CKA["CKA_KEY_TYPE"], 0x1f), (CKA["CKA_VALUE_LEN"], 16),
                      (CKA["CKA_TOKEN"], True), (CKA["CKA_LABEL"], b"written-{policy}"))
mech, _ = mechanism(CKM["CKM_AES_KEY_GEN"]); k = CK_ULONG()
print(m.C_GenerateKey(h, C.byref(mech), t, n, C.byref(k)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **group.daemon.env}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == CKR[expect]

    def holds(token: str) -> bool:
        listing = subprocess.run(["pkcs11-tool", "--module", str(SOFTHSM_SO), "--token-label", token,
                                  "--login", "--pin", USER_PIN, "--list-objects", "--type", "secrkey"],
                                 capture_output=True, text=True, env={**os.environ, **ha_tokens.env})
        return f"written-{policy}" in listing.stdout

    # primary: written on the first member only, never half on each; refuse: nowhere
    assert (holds("hsmA"), holds("hsmB")) == ((True, False) if policy == "primary" else (False, False))


def test_general_error_of_a_member_that_still_serves(ha_factory: Any) -> None:
    """CKR_GENERAL_ERROR from a member whose token still answers (modules give it for
    odd arguments too): the member is not failed, and the call is served by another
    member, so the application sees no error. CKR_DEVICE_ERROR still fails the member."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    before = group.member("hsmB")["calls_served"]
    group.set_rules("hsmA", "C_Sign error rv=CKR_GENERAL_ERROR\n")
    result = _load(group, 4, 2.0)
    assert result["errors"] == 0 and result["ops"] > 0, result
    assert group.member("hsmA")["state"] == "OK"
    assert group.member("hsmB")["calls_served"] - before >= result["ops"]  # every C_Sign
    assert "member failure detected" not in group.daemon.log_text()
    group.set_rules("hsmA", "C_Sign error rv=CKR_DEVICE_ERROR count=1\n")
    result = _load(group, 4, 2.0)
    assert result["errors"] == 0 and result["ops"] > 0, result
    assert "member failure detected: group=ha member=hsmA" in group.daemon.log_text()


def test_a_helper_that_does_not_see_the_token_is_never_handed_out(ha_factory: Any,
                                                                   ha_keys: Path) -> None:
    """A module instance can start without the token (SoftHSM2 misses one it reads while
    another instance writes it) and would answer CKR_SLOT_ID_INVALID for its whole life.
    The daemon checks each new helper and starts another: the application never sees it."""
    group: HAGroup = ha_factory("failover", ["hsmA"], daemon_extra="helper_pool = 0\n")
    first = WorkloadApp(group.daemon, ha_keys)  # takes the probe's helper: no warm one left
    first.close()
    group.set_rules("hsmA", "C_GetTokenInfo error rv=CKR_SLOT_ID_INVALID procs=1\n")
    app = WorkloadApp(group.daemon, ha_keys)  # its C_GetTokenInfo would be the failing one
    try:
        assert app.send("begin ecdsa") == "ready"
        assert app.send("finish").startswith("ok")
        served_by = group.app_helper(app.proc.pid, "hsmA")
    finally:
        app.close()
    fired = group.faultlog.read_text().splitlines()
    assert len(fired) == 1 and "C_GetTokenInfo error" in fired[0], fired
    assert f"pid={served_by} " not in fired[0]
    assert "new helper does not see the token" in group.daemon.log_text()
    assert group.member("hsmA")["state"] == "OK"


def test_a_search_reads_each_object_s_identity_once(ha_factory: Any) -> None:
    """The daemon reads what identifies each object a search finds (IDENTITY_TEMPLATE)
    once: a key has no CKA_APPLICATION, so the module answers
    CKR_ATTRIBUTE_TYPE_INVALID with the other values, an answer and no refusal to try
    again (a refusal is: tests/model's search_while_identity_reads_are_refused). Each
    read is counted in the fault module's log (a 0 ms delay on C_GetAttributeValue)."""
    group: HAGroup = ha_factory("failover", ["hsmA"])
    group.set_rules("hsmA", "C_GetAttributeValue delay ms=0\n")
    app = subprocess.run([sys.executable, "-c", f"""
import PyKCS11
lib = PyKCS11.PyKCS11Lib()
lib.load({str(CLIENT_SO)!r})
s = lib.openSession(lib.getSlotList(tokenPresent=True)[0])
s.login({USER_PIN!r})
print(len(s.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)])))
"""], env={**os.environ, **group.daemon.env}, capture_output=True, text=True, timeout=60)
    assert app.returncode == 0, app.stderr
    found = int(app.stdout)
    reads = group.faultlog.read_text().count("C_GetAttributeValue")
    assert found >= 2 and reads == found, (found, group.faultlog.read_text())
