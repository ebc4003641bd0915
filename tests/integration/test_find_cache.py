"""The find cache (`object_cache_ttl`): repeated look-ups are answered by the daemon
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

from kit import CLIENT_SO, ROOT, SOFTHSM_SO, USER_PIN, Daemon, SoftHSM, one_member_group

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
                                     text=True, env={**os.environ, **env})

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, f"the application ended at {cmd!r}"
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def cached(tmp_path: Path) -> Iterator[tuple[Daemon, SoftHSM]]:
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("tokF")
    d = Daemon(tmp_path / "p11p", {"cached": one_member_group(
        "cached", hsm, "tokF", f"object_cache_ttl = {TTL}")})
    d.start()
    yield d, hsm
    d.stop()


def member_calls(d: Daemon) -> int:
    out = subprocess.run(["p11p", "status", "--config", str(d.config), "--prometheus"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    m = re.search(r'^p11p_member_calls_total\{[^}]*\} (\d+)$', out, re.M)
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
