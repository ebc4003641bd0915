"""Limits: frame size, sessions per application, applications per uid, calls in flight
per application, helpers in total. Exceeding one gives the right CKR_*, one log line,
never a crash, and other applications are not slowed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kit import CLIENT_SO, FAULTSIM_SO, ROOT, SOFTHSM_SO, Daemon, SoftHSM

APP = f"""
import ctypes as C, sys, threading, time
sys.path.insert(0, {str(ROOT / "tests")!r})
from ckraw import Module, CK_ULONG, CKR
m = Module({str(CLIENT_SO)!r})
assert m.initialize() == 0
slot = m.slots()[0]
buf = (C.c_ubyte * 64)()
"""


@pytest.fixture
def limited(tmp_path: Path, softhsm: SoftHSM) -> Daemon:
    rules = tmp_path / "rules"
    rules.write_text("C_GenerateRandom delay ms=300\n")
    group = f"""
        label = "limited"
        [[member]]
        name = "slow"
        module = "{FAULTSIM_SO}"
        token = "tokA"
        env = {{ P11P_FAULTSIM_MODULE = "{SOFTHSM_SO}", P11P_FAULTSIM_RULES = "{rules}", SOFTHSM2_CONF = "{softhsm.conf}" }}
        """
    d = Daemon(tmp_path / "p11p", {"l": group}, daemon_extra=(
        "max_frame = 65536\nmax_sessions_per_app = 3\nmax_apps_per_uid = 3\n"
        "max_calls_per_app = 2\nmax_helpers = 3\nhelper_pool = 0\n"))
    d.start()
    yield d
    d.stop()


def run(d: Daemon, code: str) -> str:
    r = subprocess.run([sys.executable, "-c", APP + textwrap.dedent(code)], capture_output=True,
                       text=True, env={**os.environ, **d.env}, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_sessions_per_application(limited: Daemon) -> None:
    out = run(limited, """
        h = CK_ULONG()
        print(*[hex(m.C_OpenSession(slot, 4, None, None, C.byref(h))) for _ in range(4)])
        """)
    assert out.split() == ["0x0", "0x0", "0x0", "0xb1"]  # CKR_SESSION_COUNT
    assert "limit reached:" in limited.log_text() and "max_sessions_per_app = 3" in limited.log_text()


def test_calls_in_flight_per_application_do_not_slow_others(limited: Daemon) -> None:
    other = subprocess.Popen([sys.executable, "-c", APP + textwrap.dedent("""
        h = m.open_session(slot)
        sys.stdin.readline()
        t = time.monotonic(); rv = m.C_SeedRandom(h, b"x", 1)
        print(rv, time.monotonic() - t, flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **limited.env})
    busy = subprocess.Popen([sys.executable, "-c", APP + textwrap.dedent("""
        rvs = []
        def one():
            h = m.open_session(slot) if False else hs.pop()
            rvs.append(m.C_GenerateRandom(h, buf, 8))
        hs = [m.open_session(slot) for _ in range(3)]
        ts = [threading.Thread(target=one) for _ in range(3)]
        print("go", flush=True)
        [t.start() for t in ts]; [t.join() for t in ts]
        print(*sorted(hex(r) for r in rvs), flush=True)
        """)], stdout=subprocess.PIPE, text=True, env={**os.environ, **limited.env})
    try:
        assert busy.stdout is not None and busy.stdout.readline().strip() == "go"
        time.sleep(0.1)  # two slow calls in flight, the third refused
        assert other.stdin is not None and other.stdout is not None
        other.stdin.write("\n")
        other.stdin.flush()
        rv, elapsed = other.stdout.readline().split()
        assert rv == "0" and float(elapsed) < 0.25  # the other application is not held up
        assert busy.stdout.readline().split() == ["0x0", "0x0", "0x2"]  # CKR_HOST_MEMORY
    finally:
        for p in (other, busy):
            p.kill()
            p.wait()
    assert "max_calls_per_app = 2" in limited.log_text()


HOLD = """
h = m.open_session(slot)
print(m.C_SeedRandom(h, b"x", 1), flush=True)
sys.stdin.readline()
"""


def _holders(d: Daemon, n: int) -> list[subprocess.Popen[str]]:
    procs = []
    for _ in range(n):
        p = subprocess.Popen([sys.executable, "-c", APP + HOLD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, **d.env})
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "0"
    return procs


def _first_call(d: Daemon) -> str:
    code = APP.replace("slot = m.slots()[0]", "n = CK_ULONG(); print(hex(m.C_GetSlotList(1, None, C.byref(n))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **d.env}, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_applications_per_uid(limited: Daemon) -> None:
    holders = _holders(limited, 3)
    try:
        assert _first_call(limited) == "0x2"  # the fourth application: CKR_HOST_MEMORY
        assert "max_apps_per_uid = 3" in limited.log_text()
    finally:
        for p in holders:
            p.kill()
            p.wait()
    time.sleep(0.5)
    assert _first_call(limited) == "0x0"  # room again once they are gone


def test_helpers_in_total(tmp_path: Path, softhsm: SoftHSM) -> None:
    group = f"""
        label = "few-helpers"
        [[member]]
        name = "m"
        module = "{SOFTHSM_SO}"
        token = "tokA"
        env = {{ SOFTHSM2_CONF = "{softhsm.conf}" }}
        """
    d = Daemon(tmp_path / "p11p", {"h": group}, daemon_extra="max_helpers = 2\nhelper_pool = 0\n")
    d.start()
    try:
        holders = _holders(d, 2)  # one helper each (the probe's helper was reused)
        try:
            out = subprocess.run([sys.executable, "-c", APP + "h = CK_ULONG(); print(hex(m.C_OpenSession(slot, 4, None, None, C.byref(h))))"],
                                 capture_output=True, text=True, env={**os.environ, **d.env}, timeout=60)
            assert out.stdout.strip() == "0x2", out.stderr  # CKR_HOST_MEMORY, not a member failure
            assert "helper limit reached: 2 helpers run (max_helpers)" in d.log_text()
            assert "member failure detected" not in d.log_text()
        finally:
            for p in holders:
                p.kill()
                p.wait()
    finally:
        d.stop()


def test_oversized_frame_closes_only_that_connection(limited: Daemon) -> None:
    out = run(limited, """
        h = m.open_session(slot)
        big = b"x" * 100000
        rv = m.C_SeedRandom(h, big, len(big))
        h2 = m.open_session(slot)
        print(hex(rv), m.C_SeedRandom(h2, b"x", 1))
        """)
    rv, after = out.split()
    assert rv == "0x30" and after == "0"  # CKR_DEVICE_ERROR for that call; the next one works
    assert "exceeds the limit of 65536" in limited.log_text()
