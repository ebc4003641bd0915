"""What the daemon answers itself: mechanism information, and searches from the find
cache (`object_cache_ttl`): repeated look-ups are answered by the daemon
without a call to the member; a write through p11p, by any application, shows at once;
a write behind p11p's back shows within the time-to-live; private objects show only once
logged in; the find operation keeps its PKCS#11 rules (one at a time, ended by Final).
Applications are real processes on p11p-client.so; the writes behind p11p's back go to
SoftHSM2 directly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import (
    ASAN_CLIENT_SO,
    CLIENT_SO,
    ROOT,
    SOFTHSM_SO,
    USER_PIN,
    Daemon,
    SoftHSM,
    one_member_group,
    sanitized,
)

TTL = 2.0

APP = f"""
import ctypes as C, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from ckraw import Module, CK_ULONG, template
CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKO_DATA = 0x0, 0x1, 0x2, 0x3, 0x0
m = Module(sys.argv[1])
assert m.initialize() == 0
slot = None
for s in m.slots():
    info = (C.c_ubyte * 512)()
    assert m.C_GetTokenInfo(s, info) == 0
    if bytes(info[:32]).rstrip() == sys.argv[2].encode():
        slot = s
h = m.open_session(slot)
def find(label, n=64):
    t, count, keep = template((CKA_LABEL, label.encode()))
    rv = m.C_FindObjectsInit(h, t, count)
    if rv:
        return rv, []
    out = (CK_ULONG * n)()
    got = CK_ULONG()
    rv = m.C_FindObjects(h, out, n, C.byref(got))
    assert rv == 0, hex(rv)
    assert m.C_FindObjectsFinal(h) == 0
    return 0, list(out[:got.value])
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "find":
        rv, found = find(arg[0])
        print(hex(rv), len(found), flush=True)
    elif cmd in ("create", "private"):
        t, count, keep = template((CKA_CLASS, CKO_DATA), (CKA_TOKEN, True),
                                  (CKA_PRIVATE, cmd == "private"), (CKA_LABEL, arg[0].encode()))
        o = CK_ULONG()
        print(hex(m.C_CreateObject(h, t, count, C.byref(o))), flush=True)
    elif cmd == "destroy":
        rv, found = find(arg[0])
        print(hex(m.C_DestroyObject(h, found[0])), flush=True)
    elif cmd == "login":
        print(hex(m.login(h, {USER_PIN.encode()!r})), flush=True)
    elif cmd == "logout":
        print(hex(m.C_Logout(h)), flush=True)
    elif cmd == "many":
        for i in range(int(arg[1])):
            t, count, keep = template((CKA_CLASS, CKO_DATA), (CKA_TOKEN, False),
                                      (CKA_PRIVATE, False), (CKA_LABEL, arg[0].encode()))
            o = CK_ULONG()
            assert m.C_CreateObject(h, t, count, C.byref(o)) == 0
        print("0x0", flush=True)
    elif cmd == "batches":  # the whole result, k handles at a time, on a second session
        h2 = m.open_session(slot)
        t, count, keep = template((CKA_LABEL, arg[0].encode()))
        assert m.C_FindObjectsInit(h2, t, count) == 0
        k, seen = int(arg[1]), []
        out = (CK_ULONG * k)()
        got = CK_ULONG()
        while True:
            assert m.C_FindObjects(h2, out, k, C.byref(got)) == 0
            assert got.value <= k
            if got.value == 0:
                break
            seen += list(out[:got.value])
        zero = m.C_FindObjects(h2, None, 0, C.byref(got))  # a count of 0 asks for nothing
        assert m.C_FindObjectsFinal(h2) == 0
        assert m.C_CloseSession(h2) == 0
        print(hex(zero), got.value, len(seen), len(set(seen)), flush=True)
    elif cmd == "close":
        print(hex(m.C_CloseSession(h)), flush=True)
        h = m.open_session(slot)
    elif cmd == "rules":
        t, count, keep = template((CKA_LABEL, arg[0].encode()))
        first = m.C_FindObjectsInit(h, t, count)
        again = m.C_FindObjectsInit(h, t, count)
        end = m.C_FindObjectsFinal(h)
        out = (CK_ULONG * 4)()
        got = CK_ULONG()
        after = m.C_FindObjects(h, out, 4, C.byref(got))
        print(hex(first), hex(again), hex(end), hex(after), flush=True)
"""


class App:
    def __init__(self, module: Path, token: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(APP), str(module),
                                      token], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer:
            assert self.proc.stderr is not None
            self.proc.wait(10)
            raise AssertionError(f"the application ended at {cmd!r}: "
                                 f"{self.proc.stderr.read()[-3000:]}")
        return answer

    def close(self) -> str:
        """Ends the application; its standard error."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


@pytest.fixture
def cached(tmp_path: Path) -> Iterator[tuple[Daemon, SoftHSM]]:
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("tokF")
    hsm.init_token("tokG")
    d = Daemon(tmp_path / "p11p", {
        "cached": one_member_group("cached", hsm, "tokF", f"object_cache_ttl = {TTL}"),
        "uncached": one_member_group("uncached", hsm, "tokG", "object_cache_ttl = 0")})
    d.start()
    yield d, hsm
    d.stop()


def member_calls(d: Daemon) -> int:
    out = subprocess.run(["p11p", "status", "--config", str(d.config), "--prometheus"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    m = re.search(r'^p11p_member_calls_total\{group="cached"[^}]*\} (\d+)$', out, re.M)
    assert m is not None, out
    return int(m.group(1))


def test_find_cache(cached: tuple[Daemon, SoftHSM]) -> None:
    d, hsm = cached
    app = App(CLIENT_SO, "cached", d.env)
    other = App(CLIENT_SO, "cached", d.env)
    direct = App(SOFTHSM_SO, "tokF", dict(hsm.env))
    try:
        assert app.ask("login") == "0x0"
        assert app.ask("find k") == "0x0 0"
        # the other application has started (its C_Initialize, slot look-up and session
        # are member calls too) before the count is taken
        assert other.ask("find k") == "0x0 0"
        # the same look-up again and again: answered by the daemon, the member not asked
        before = member_calls(d)
        for _ in range(20):
            assert app.ask("find k") == "0x0 0"
        assert member_calls(d) == before
        # writes through p11p show at once, whichever application makes them
        assert app.ask("create k") == "0x0"
        assert app.ask("find k") == "0x0 1"
        assert other.ask("create k") == "0x0"
        assert app.ask("find k") == "0x0 2"
        assert app.ask("destroy k") == "0x0"
        assert app.ask("find k") == "0x0 1"
        # a write behind p11p's back shows once the time-to-live has passed
        assert direct.ask("login") == "0x0"
        assert direct.ask("create k") == "0x0"
        assert direct.ask("find k") == "0x0 2"
        t = time.monotonic()
        assert app.ask("find k") == "0x0 1"  # cached, and younger than TTL
        assert time.monotonic() - t < TTL
        time.sleep(TTL + 0.2)
        assert app.ask("find k") == "0x0 2"
        # private objects: not seen before login, seen after, with the cache on
        assert app.ask("private p") == "0x0"
        assert other.ask("find p") == "0x0 0"
        assert other.ask("find p") == "0x0 0"
        assert other.ask("login") == "0x0"
        assert other.ask("find p") == "0x0 1"
        assert other.ask("logout") == "0x0"
        assert other.ask("find p") == "0x0 0"
        # the operation's rules: one find at a time; Final ends it (cached or not)
        assert app.ask("find k") == "0x0 2"  # the template is in the cache
        # CKR_OPERATION_ACTIVE, then CKR_OPERATION_NOT_INITIALIZED
        assert app.ask("rules k") == "0x0 0x90 0x0 0x91"
        assert direct.ask("rules k") == "0x0 0x90 0x0 0x91"  # as the module itself says
    finally:
        for a in (app, other, direct):
            a.close()


@pytest.mark.parametrize("group, token", [("cached", "tokF"), ("uncached", "tokG")])
def test_search_results_handed_out_by_the_library(cached: tuple[Daemon, SoftHSM], group: str,
                                                  token: str) -> None:
    """The client library holds a search's whole result (cached by the daemon or not):
    C_FindObjects hands it out in the batches asked for, each object once; session
    objects go with their session; the sanitized client finds nothing to complain of."""
    d, hsm = cached
    app = App(ASAN_CLIENT_SO, group, {**d.env, **sanitized()})
    direct = App(SOFTHSM_SO, token, dict(hsm.env))
    stderr = ""
    try:
        assert app.ask("many s 300") == "0x0"
        for k in (1, 7, 256, 1000):
            assert app.ask(f"batches s {k}") == "0x0 0 300 300"
        assert app.ask("find s") == "0x0 64"  # C_FindObjects gives at most what was asked
        assert app.ask("close") == "0x0"  # its session objects are gone
        assert app.ask("batches s 50") == "0x0 0 0 0"
        # a token object made behind p11p's back: shown at once when the cache is off
        assert app.ask("find d") == "0x0 0"
        assert direct.ask("login") == "0x0" and direct.ask("create d") == "0x0"
        assert app.ask("find d") == ("0x0 1" if group == "uncached" else "0x0 0")
        assert app.ask("rules s") == "0x0 0x90 0x0 0x91"
    finally:
        stderr = app.close()
        direct.close()
    assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr[-3000:]


def test_mechanisms_answered_by_the_daemon(cached: tuple[Daemon, SoftHSM]) -> None:
    """C_GetMechanismList/Info: the member's answers, the same as the module's own, and
    asked of the member once only."""
    d, hsm = cached

    def mechanisms(module: Path, token: str, env: dict[str, str]) -> str:
        r = subprocess.run(["pkcs11-tool", "--module", str(module), "--token-label", token,
                            "-M"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        return r.stdout

    direct = mechanisms(SOFTHSM_SO, "tokF", dict(hsm.env))
    assert "ECDSA" in direct and "AES-GCM" in direct
    assert mechanisms(CLIENT_SO, "cached", d.env) == direct
    before = member_calls(d)
    assert mechanisms(CLIENT_SO, "cached", d.env) == direct
    # the second application's look-ups: none reached the member (C_GetTokenInfo aside;
    # without the daemon's answers, one call per mechanism would)
    assert member_calls(d) - before <= 1, member_calls(d) - before
