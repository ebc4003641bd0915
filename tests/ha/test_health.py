"""Health probes (issue 15): members are probed on their own helpers, standby ones
included, so a dead member is seen without application traffic; a member that fails
only some calls is kept out by the "sign" probe, or held out longer each time it comes
back and fails again; `p11p status` shows the last probe and the hold-out."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hakit import HAGroup, PyApp, ha_softhsm
from kit import SOFTHSM_SO, USER_PIN, SoftHSM, wait_for
from test_direct_path import _run

PROBE_KEY = f"""
t = [(P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_GENERIC_SECRET),
     (P.CKA_TOKEN, True), (P.CKA_PRIVATE, False), (P.CKA_LABEL, "ha-probe"),
     (P.CKA_VALUE, bytes(range(32))), (P.CKA_SIGN, True), (P.CKA_VERIFY, True)]
slot = [s for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip() == LABEL][0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
s.login("{USER_PIN}")
s.createObject(t)
s.logout()
_ = 1
"""


@pytest.fixture(scope="module")
def probe_tokens(tmp_path_factory: pytest.TempPathFactory, ha_keys: Path) -> SoftHSM:
    """Tokens of their own (the probe key is one more token object), with the usual keys
    and a secret key usable without login, labelled ha-probe."""
    hsm = ha_softhsm(tmp_path_factory.mktemp("health-softhsm"), ha_keys, ("hsmA", "hsmB"))
    for label in ("hsmA", "hsmB"):
        app = PyApp(None, SOFTHSM_SO, env=hsm.env)
        try:
            app.run(f"LABEL = {label!r}\n" + PROBE_KEY)
        finally:
            app.close()
    return hsm


@pytest.fixture
def group_of(tmp_path: Path, probe_tokens: SoftHSM) -> Iterator[Any]:
    made: list[HAGroup] = []

    def make(health: str, recovery: str = "") -> HAGroup:
        g = HAGroup(tmp_path / f"g{len(made)}", probe_tokens, "failover", ["hsmA", "hsmB"],
                    extra=f"[health]\n{health}\n")
        if recovery:  # hakit's [recovery] table, with another max_interval
            path = g.daemon.config.parent / "tokens.d" / "ha.toml"
            path.write_text(path.read_text().replace("max_interval = 2\n", f"{recovery}\n"))
        made.append(g)
        g.daemon.start()
        return g

    yield make
    for g in made:
        g.daemon.stop()


def _recovered(group: HAGroup, member: str) -> int:
    return len(re.findall(f"member recovered: group=ha member={member} ",
                          group.daemon.log_text()))


def test_a_dead_standby_member_is_seen_without_traffic(group_of: Any) -> None:
    """hsmB, the standby of a failover group, stops answering (every call fails with
    CKR_DEVICE_ERROR) while no application runs: it is marked failed within
    interval + 1 s. Its status shows the last probe."""
    group: HAGroup = group_of("interval = 1")
    assert wait_for(lambda: (group.member("hsmB").get("probe") or {}).get("ok") is True, 5)
    probe = group.member("hsmB")["probe"]
    assert probe["latency_ms"] > 0 and probe["ago"] < 2.5, probe
    group.set_rules("hsmB", "* error rv=CKR_DEVICE_ERROR\n")
    start = time.monotonic()
    assert wait_for(lambda: group.member("hsmB")["state"] != "OK", 5)
    took = time.monotonic() - start
    print(f"dead standby marked after {took:.2f} s (interval 1 s)")
    assert took <= 1 + 1, took
    assert group.member("hsmA")["state"] == "OK"
    log = group.daemon.log_text()
    assert "member failure detected: group=ha member=hsmB" in log and "call=health probe" in log
    group.set_rules("hsmB", "")
    assert wait_for(lambda: group.member("hsmB")["state"] == "OK", 10)
    status = subprocess.run([sys.executable, "-m", "p11p.daemon", "status", "--config",
                             str(group.daemon.config)], capture_output=True, text=True)
    assert "last probe:" in status.stdout, status.stdout


def _sign_with_sign_fault(group: HAGroup, keys: Path) -> dict[str, Any]:
    """Four signing threads for 4 s; hsmA's C_Sign fails from 1 s on."""
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(_run(group, keys, 4, 4.0)))
    runner.start()
    time.sleep(1.0)
    group.set_rules("hsmA", "C_Sign error rv=CKR_DEVICE_ERROR\n")
    runner.join()
    return result


def test_the_sign_probe_keeps_a_member_that_cannot_sign_out(group_of: Any, ha_keys: Path) -> None:
    """probe = "sign": a member whose C_Sign fails (its token answers everything else)
    fails once under the load, and recovery, which signs too, does not bring it back
    while the fault lasts: no application error, no return."""
    group: HAGroup = group_of('interval = 1\nprobe = "sign"\nprobe_key = "ha-probe"')
    try:
        result = _sign_with_sign_fault(group, ha_keys)
        print(f"sign probe: {result['ops']} signatures, {result['errors']} errors, "
              f"hsmA returned {_recovered(group, 'hsmA')} times")
        assert result["errors"] == 0 and result["ops"] > 20, result
        assert _recovered(group, "hsmA") == 0
        assert group.member("hsmA")["state"] in ("FAILED", "RECOVERING")
    finally:
        group.set_rules("hsmA", "")
    assert wait_for(lambda: group.member("hsmA")["state"] == "OK", 10)


def test_a_member_that_fails_again_soon_is_held_out_longer(group_of: Any, ha_keys: Path) -> None:
    """probe = "token-info" does not sign: the member comes back and fails at the next
    signature. Each return is followed by a hold-out twice the last (recovery interval
    0.2 s, max_interval 4 s): over 3 s at most one return per hold-out (0.4, 0.8, 1.6 s
    and the first: 4), not one every 0.2 s; and no application error."""
    group: HAGroup = group_of("interval = 1", "max_interval = 4")
    try:
        result = _sign_with_sign_fault(group, ha_keys)
        returns = _recovered(group, "hsmA")
        held = re.findall(r"member held out: group=ha member=hsmA for ([\d.]+) s",
                          group.daemon.log_text())
        print(f"token-info probe: {result['ops']} signatures, {result['errors']} errors, "
              f"hsmA returned {returns} times, hold-outs {held}")
        assert result["errors"] == 0 and result["ops"] > 20, result
        assert 1 <= returns <= 4, (returns, held)
        times = [float(h) for h in held]
        assert times and times == sorted(times) and times[0] == 0.4 and max(times) <= 4, held
        assert len(held) >= returns - 1, (returns, held)
        assert group.member("hsmA")["held_out"] >= 0
    finally:
        group.set_rules("hsmA", "")
