"""The direct path (daemon/direct.py, helper/fast.c, client/direct.c, client/plane*.c): a
session that makes hot calls is bound to its member session, and C_GenerateRandom, C_SignInit and
C_Sign go from the client library straight to the helper. These tests check that the
calls really go that way, that the answers are right (signatures verify), and that the
daemon's guarantees hold on it: a failing, hanging or drained member loses nothing, and
the helper's socket serves nobody but the bound application."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from hakit import HAGroup
from kit import (
    ASAN_CLIENT_SO,
    CLIENT_SO,
    ROOT,
    USER_PIN,
    helper_pids,
    sanitized,
    sanitized_helper,
    sanitizer_reports,
)

# N threads, each with its own session, sign with the imported ECDSA key (and draw
# random bytes) for S seconds; every signature is verified. One JSON line at the end.
APP = textwrap.dedent(f"""
    import ctypes as C, json, os, sys, threading, time
    sys.path.insert(0, {str(ROOT / "tests")!r})
    from ckraw import CK_ULONG, CKA, CKM, Module, mechanism, template
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
    module, threads, seconds, keys = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    public = serialization.load_pem_public_key(json.load(open(keys))["ec_public"].encode())
    m = Module(module)
    assert m.initialize() == 0
    def label(s):
        info = (C.c_ubyte * 512)()
        assert m.C_GetTokenInfo(s, info) == 0
        return bytes(info[:32]).rstrip()
    slot = next(s for s in m.slots() if label(s) == b"ha")
    base = m.open_session(slot)
    assert m.login(base, {USER_PIN.encode()!r}) == 0
    t, n, keep = template((CKA["CKA_LABEL"], b"ha-ec"), (CKA["CKA_CLASS"], 3))
    assert m.C_FindObjectsInit(base, t, n) == 0
    out, count = (CK_ULONG * 2)(), CK_ULONG()
    assert m.C_FindObjects(base, out, 2, C.byref(count)) == 0 and count.value == 1
    m.C_FindObjectsFinal(base)
    key = out[0]
    ops, errors, slowest = [0] * threads, [], [0.0]
    stop = time.monotonic() + seconds
    def worker(i):
        h = m.open_session(slot)
        mech, _ = mechanism(CKM["CKM_ECDSA"])
        rnd = (C.c_ubyte * 32)()
        def timed(fn, *args):  # the slowest single call of the run
            start = time.monotonic()
            rv = fn(*args)
            slowest[0] = max(slowest[0], time.monotonic() - start)
            return rv
        while time.monotonic() < stop:
            digest = os.urandom(32)
            what, rv = "C_GenerateRandom", timed(m.C_GenerateRandom, h, rnd, 32)
            if rv == 0:
                what, rv = "C_SignInit", timed(m.C_SignInit, h, C.byref(mech), key)
            if rv == 0:
                ln = CK_ULONG(0)
                what, rv = "C_Sign length", timed(m.C_Sign, h, digest, 32, None, C.byref(ln))
                if rv == 0 and ln.value != 64:
                    rv = -1
            if rv == 0:
                sig = (C.c_ubyte * 64)()
                what, rv = "C_Sign", timed(m.C_Sign, h, digest, 32, sig, C.byref(ln))
            if rv != 0:
                errors.append(f"{{what}} {{rv:#x}}")
                continue
            r, s = int.from_bytes(bytes(sig[:32]), "big"), int.from_bytes(bytes(sig[32:64]), "big")
            try:
                public.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
            except Exception:
                errors.append("bad signature")
                continue
            ops[i] += 1
        assert m.C_CloseSession(h) == 0
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    print(json.dumps({{"ops": sum(ops), "errors": len(errors), "first_errors": errors[:5],
                      "slowest": slowest[0]}}), flush=True)
    assert m.C_Finalize(None) == 0
""")


def _run(group: HAGroup, keys: Path, threads: int, seconds: float,
         env: dict[str, str] | None = None, module: Path = CLIENT_SO) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", APP, str(module), str(threads), str(seconds),
                        str(keys)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **group.daemon.env, **(env or {})})
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def _in_background(group: HAGroup, keys: Path, threads: int, seconds: float,
                   result: dict[str, Any], sanitize: bool = False) -> threading.Thread:
    kw: dict[str, Any] = {"env": sanitized(), "module": ASAN_CLIENT_SO} if sanitize else {}
    runner = threading.Thread(target=lambda: result.update(_run(group, keys, threads, seconds,
                                                                 **kw)))
    runner.start()
    return runner


def _served(group: HAGroup) -> tuple[int, int]:
    """(calls served, of which on the direct path), over the group's members."""
    members = group.status()["groups"][0]["members"]
    return (sum(m["calls_served"] for m in members),
            sum(m["direct_calls_served"] for m in members))


def test_hot_calls_of_a_bound_session_go_straight_to_the_helper(ha_factory: Any,
                                                                 ha_keys: Path) -> None:
    """Three member calls per round (random, init, sign) and a length query: through the
    daemon until the session is bound (after three of them), straight to the helper
    after that, and counted either way; the length query is answered by the library
    from the member's first answer to it (client/README.md, "Signature lengths"). With
    P11P_DIRECT=0 the daemon carries them all, the length queries too. Every signature
    verifies."""
    group: HAGroup = ha_factory("failover", ["hsmA"])
    calls, direct = _served(group)
    result = _run(group, ha_keys, 2, 1.5)
    assert result["errors"] == 0 and result["ops"] > 20, result
    calls, direct = (a - b for a, b in zip(_served(group), (calls, direct), strict=True))
    rounds = 3 * result["ops"]
    assert rounds <= calls <= rounds + 64, (calls, result)  # its setup: login, search, ...
    assert direct >= rounds - 2 * 8, (direct, calls, result)  # all but the first few
    calls, direct = _served(group)
    result = _run(group, ha_keys, 2, 1.5, env={"P11P_DIRECT": "0"})
    assert result["errors"] == 0 and result["ops"] > 20, result
    assert _served(group)[0] - calls >= 4 * result["ops"]
    assert _served(group)[1] == direct  # not one call on the direct path


def test_a_member_that_fails_under_direct_calls_loses_nothing(ha_factory: Any, ha_keys: Path,
                                                              tmp_path: Path) -> None:
    """CKR_DEVICE_ERROR from the member on a direct C_Sign: the sessions come back
    through the daemon, which fails them over with their sign operation replayed. The
    application (on the ASan/UBSan build of the client) sees no error; every signature
    verifies. The helpers run on the extension's ASan/UBSan twin (kit.sanitized_helper):
    the data plane's C under load, its failure and the failover, with no report."""
    logs = tmp_path / "sanitizers"
    logs.mkdir()
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"],
                                member_env=sanitized_helper(logs))
    result: dict[str, Any] = {}
    runner = _in_background(group, ha_keys, 4, 4.0, result, sanitize=True)
    time.sleep(1.5)
    assert group.member("hsmA")["sessions"] > 0
    helpers = helper_pids(group.daemon.proc.pid) if group.daemon.proc else []
    assert any("-sanitized/_cryptoki" in m and "libasan" in m for m in map(_maps, helpers)), \
        helpers
    group.set_rules("hsmA", "C_Sign error rv=CKR_DEVICE_ERROR\n")
    group.wait_state("hsmA", "FAILED", timeout=5)
    runner.join()
    assert result["errors"] == 0 and result["ops"] > 50, result
    assert "C_Sign error" in group.faultlog.read_text()
    assert "member failure detected: group=ha member=hsmA" in group.daemon.log_text()
    group.daemon.stop()  # the helpers end: whatever they had to report is written
    assert sanitizer_reports(logs) == []


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def test_a_hung_direct_call_ends_at_call_timeout_and_fails_over(ha_factory: Any,
                                                                ha_keys: Path) -> None:
    """A member that hangs in C_Sign: the client gives the direct call the member's part
    of call_timeout (2/3 of 1.5 s here), then the daemon kills that helper and the call
    runs on the other member in the rest. No error; no call over call_timeout."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    result: dict[str, Any] = {}
    runner = _in_background(group, ha_keys, 2, 5.0, result)
    time.sleep(1.5)
    group.set_rules("hsmA", "C_Sign hang\n")
    group.wait_state("hsmA", "FAILED", timeout=8)
    group.set_rules("hsmA", "")
    runner.join()
    assert result["errors"] == 0 and result["ops"] > 20, result
    assert 0.9 < result["slowest"] <= 1.5, result
    assert "exceeded its member's part of call_timeout" in group.daemon.log_text()


def test_a_helper_killed_in_a_direct_call_is_seen_at_once(ha_factory: Any,
                                                          ha_keys: Path) -> None:
    """A member hangs in C_Sign and then its helpers are killed: a direct call waiting on
    its connection's mailbox sees the helper gone within its look at the socket (20 ms,
    client/box.c), not at the member's part of call_timeout (1 s here), and the call runs
    on the other member. No error; every call well under that second."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    result: dict[str, Any] = {}
    runner = _in_background(group, ha_keys, 2, 4.0, result)
    time.sleep(1.5)
    group.set_rules("hsmA", "C_Sign hang\n")
    time.sleep(0.3)
    pids = {int(p) for p in re.findall(r"member=hsmA helper pid=(\d+)", group.daemon.log_text())}
    killed = 0
    for pid in pids & set(helper_pids(group.daemon.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    assert killed > 0
    group.wait_state("hsmA", "FAILED", timeout=5)
    group.set_rules("hsmA", "")
    runner.join()
    assert result["errors"] == 0 and result["ops"] > 20, result
    assert result["slowest"] < 0.8, result
    assert "exceeded its member's part of call_timeout" not in group.daemon.log_text()


def test_drain_revokes_the_bindings_of_the_member(ha_factory: Any, ha_keys: Path) -> None:
    """Draining a member ends the bindings of its sessions: their next direct call is
    refused by the helper and the session moves. After the drain, a rule that would fail
    every C_Sign on the drained member never fires, while the load goes on."""
    group: HAGroup = ha_factory("balance", ["hsmA", "hsmB"])
    result: dict[str, Any] = {}
    runner = _in_background(group, ha_keys, 4, 5.0, result)
    time.sleep(1.5)
    assert group.member("hsmA")["sessions"] > 0
    r = subprocess.run([sys.executable, "-m", "p11p.daemon", "member", "drain", "ha", "hsmA",
                        "--config", str(group.daemon.config)], capture_output=True, text=True)
    assert r.returncode == 0 and "DRAINING" in r.stdout, r.stdout + r.stderr
    time.sleep(0.5)
    group.set_rules("hsmA", "C_Sign error rv=CKR_DEVICE_ERROR\nC_GenerateRandom error rv=CKR_DEVICE_ERROR\n")
    served_b = group.member("hsmB")["calls_served"]
    time.sleep(1.5)
    assert group.member("hsmB")["calls_served"] > served_b + 100  # the load goes on, on B
    runner.join()
    assert result["errors"] == 0 and result["ops"] > 50, result
    fired = group.faultlog.read_text() if group.faultlog.exists() else ""
    assert "C_Sign error" not in fired and "C_GenerateRandom error" not in fired, fired
    assert group.member("hsmA")["sessions"] == 0


def _direct_names(daemon_pid: int) -> set[str]:
    """The data-plane listeners of the daemon's helpers (the suite runs other daemons
    meanwhile, whose listeners come and go)."""
    inodes = set()
    for pid in helper_pids(daemon_pid):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # the helper ended meanwhile
            continue
    names = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("@p11p-direct-") and fields[6] in inodes:
            names.add(fields[7][1:])
    return names


def test_the_helper_socket_serves_only_the_bound_application(ha_factory: Any,
                                                            ha_keys: Path) -> None:
    """The helper listens on an abstract socket: a connection without the daemon's token
    for that application is closed before anything is read from it, whatever it sends."""
    group: HAGroup = ha_factory("failover", ["hsmA"])
    before = _direct_names(group.daemon.pid)
    result: dict[str, Any] = {}
    runner = _in_background(group, ha_keys, 1, 3.0, result)
    deadline = time.monotonic() + 10
    names: set[str] = set()
    while time.monotonic() < deadline and not names:
        names = _direct_names(group.daemon.pid) - before
        time.sleep(0.05)
    assert names, "no direct-path listener appeared"
    name = sorted(names)[0]
    # [44 C_Sign, id 4097, data, capacity 64]: a well-formed request with a wrong token
    frame = bytes([0x94, 44, 0xcd, 0x10, 0x01, 0xc4, 1, 0, 64])
    for hello in (bytes(16), os.urandom(16), b"", b"\x00" * 15):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect("\0" + name)
            try:
                s.sendall(hello + len(frame).to_bytes(4, "big") + frame)
                if len(hello) < 16:
                    s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed already
            try:
                answer = s.recv(100)
            except ConnectionResetError:  # closed with our frame unread
                answer = b""
            assert answer == b"", hello  # closed, no answer
    runner.join()
    assert result["errors"] == 0 and result["ops"] > 0, result


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_bound_sessions_fail_back_when_the_first_member_recovers(ha_factory: Any,
                                                                 ha_keys: Path) -> None:
    """Policy failover: while hsmA is down the sessions bind on hsmB; once hsmA is back
    they are unbound there and bind on hsmA again (the policy's choice), losing nothing."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    result: dict[str, Any] = {}
    runner = _in_background(group, ha_keys, 2, 8.0, result)
    _wait(lambda: group.member("hsmA")["direct_sessions"] == 2, 5, "never bound on hsmA")
    group.set_rules("hsmA", "* error rv=CKR_DEVICE_ERROR\n")
    group.wait_state("hsmA", "FAILED", timeout=5)
    _wait(lambda: group.member("hsmB")["direct_sessions"] == 2, 5, "never bound on hsmB")
    group.set_rules("hsmA", "")
    group.wait_state("hsmA", "OK", timeout=10)
    _wait(lambda: group.member("hsmA")["direct_sessions"] == 2
          and group.member("hsmB")["direct_sessions"] == 0, 5, "no fail-back to hsmA")
    runner.join()
    assert result["errors"] == 0 and result["ops"] > 50, result
