"""Sessions the client library opens itself (link feature client_open, client/sessions.h):
a session opened on a slot the daemon opened one on before is answered in the library
and opened at the daemon at its first call that travels.

The same application script runs on SoftHSM2 directly and through p11p (one member on
the same token) and must print the same lines: login state across sessions of the
library's and the daemon's, the last session's close, an SO login and read-only
sessions, C_InitToken while sessions exist, closes and C_CloseAllSessions. Then, with
the daemon frozen (SIGSTOP), opening and closing such sessions still answers at once,
and their first call is served once it runs again."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from kit import (
    ASAN_CLIENT_SO,
    CLIENT_SO,
    SO_PIN,
    SOFTHSM_SO,
    USER_PIN,
    Daemon,
    SoftHSM,
    one_member_group,
    sanitized,
)

SCRIPT = """
import sys, PyKCS11
from PyKCS11 import LowLevel as L
module, label = sys.argv[1], sys.argv[2]
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = next(s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == label)
RW = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
RO = PyKCS11.CKF_SERIAL_SESSION

def say(name, f):
    try:
        value = f()
    except PyKCS11.PyKCS11Error as e:
        value = PyKCS11.CKR[e.value]
    print(f"{name}={value}", flush=True)
    return value

def private(s):
    return len(s.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA),
                              (PyKCS11.CKA_LABEL, "client-open")]))

def state(s):
    return PyKCS11.CKS[s.getSessionInfo().state]

first = lib.openSession(slot, RW)          # through the daemon: the slot is known after it
first.login(PIN)
say("create", lambda: first.createObject([
    (PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA), (PyKCS11.CKA_TOKEN, True),
    (PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_LABEL, "client-open"),
    (PyKCS11.CKA_VALUE, b"x")]) is not None)
first.logout()
ro = lib.openSession(slot, RO)
rw = lib.openSession(slot, RW)
say("ro.state", lambda: state(ro))
say("ro.login", lambda: ro.login(PIN))
say("rw.state", lambda: state(rw))
say("rw.private", lambda: private(rw))
say("first.close", lambda: first.closeSession())    # the daemon's: others stay logged in
say("rw.private.after", lambda: private(rw))
late = lib.openSession(slot, RO)
say("late.state", lambda: state(late))
say("late.private", lambda: private(late))
say("ro.close", lambda: ro.closeSession())
say("rw.close", lambda: rw.closeSession())
say("late.close", lambda: late.closeSession())      # the last one: logged out
again = lib.openSession(slot, RO)
say("again.state", lambda: state(again))
say("again.private", lambda: private(again))
so = lib.openSession(slot, RW)
say("so.login.ro.exists", lambda: so.login(SO_PIN, PyKCS11.CKU_SO))
say("again.close", lambda: again.closeSession())
say("so.login", lambda: so.login(SO_PIN, PyKCS11.CKU_SO))
say("open.ro.while.so", lambda: lib.openSession(slot, RO))
say("so.logout", lambda: so.logout())
say("so.close", lambda: so.closeSession())
held = lib.openSession(slot, RO)
say("inittoken.session.exists", lambda: lib.initToken(slot, SO_PIN, label))
say("held.close", lambda: held.closeSession())
say("held.close.again", lambda: held.closeSession())
say("held.random", lambda: len(held.generateRandom(8)))
a, b = lib.openSession(slot, RO), lib.openSession(slot, RW)
say("closeall", lambda: lib.closeAllSessions(slot))
say("a.random", lambda: len(a.generateRandom(8)))
say("b.random", lambda: len(b.generateRandom(8)))
last = lib.openSession(slot, RW)
last.login(PIN)
say("destroy", lambda: last.destroyObject(last.findObjects([(PyKCS11.CKA_LABEL, "client-open")])[0]))
say("last.random", lambda: len(last.generateRandom(8)))
""".replace("PIN)", f"{USER_PIN!r})").replace("SO_PIN", repr(SO_PIN))


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    hsm = SoftHSM(tmp_path_factory.mktemp("client-open-hsm"))
    hsm.init_token("tokC")
    return hsm


@pytest.fixture(scope="module")
def p11p(token: SoftHSM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("client-open"), {"c": one_member_group("opens", token, "tokC")})
    d.start()
    yield d
    d.stop()


def _run(module: Path, label: str, env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(module), label], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _client_opens(d: Daemon) -> int:
    from p11p.daemon.cli import admin_request
    (group,) = admin_request(d.socket.with_name(d.socket.name + ".admin"), {"cmd": "status"})["groups"]
    return int(group["client_opens"])


@pytest.mark.parametrize("client_open,build", [("1", "plain"), ("0", "plain"), ("1", "asan")])
def test_sessions_of_the_library_answer_as_the_token(token: SoftHSM, p11p: Daemon,
                                                     client_open: str, build: str) -> None:
    direct = _run(SOFTHSM_SO, "tokC", token.env)
    assert "rw.private.after=1" in direct and "so.login.ro.exists=CKR_SESSION_READ_ONLY_EXISTS" in direct
    before = _client_opens(p11p)
    client, env = (CLIENT_SO, {}) if build == "plain" else (ASAN_CLIENT_SO, sanitized())
    through = _run(client, "opens", {**p11p.env, **env, "P11P_CLIENT_OPEN": client_open})
    assert through == direct
    # P11P_CLIENT_OPEN=0: every open went to the daemon; else the library opened some
    assert (_client_opens(p11p) > before) == (client_open == "1")


FROZEN = """
import ctypes as C, os, signal, sys, time
sys.path.insert(0, {tests!r})
from ckraw import Module, CK_ULONG
m = Module({client!r})
assert m.initialize() == 0
slot = m.slots()[0]
h = CK_ULONG()
assert m.C_OpenSession(slot, 6, None, None, C.byref(h)) == 0   # the daemon's
assert h.value < 0x40000000 and m.C_CloseSession(h) == 0
os.kill({pid}, signal.SIGSTOP)
try:
    start = time.monotonic()
    for _ in range(1000):
        assert m.C_OpenSession(slot, 6, None, None, C.byref(h)) == 0
        assert m.C_CloseSession(h) == 0
    assert m.C_OpenSession(slot, 6, None, None, C.byref(h)) == 0
    print("open-close", round(time.monotonic() - start, 3))
    buf = (C.c_ubyte * 16)()
    print("frozen.random", hex(m.C_GenerateRandom(h, buf, 16)))  # P11P_TIMEOUT_MS
finally:
    os.kill({pid}, signal.SIGCONT)
print("random", hex(m.C_GenerateRandom(h, buf, 16)), any(buf))
print("close", hex(m.C_CloseSession(h)))
"""


@pytest.mark.parametrize("build", ["plain", "asan"])
def test_open_and_close_need_no_daemon(p11p: Daemon, build: str) -> None:
    """1,000 opens and closes of the library's sessions while the daemon is stopped: each
    answers without a round trip (a round trip would fail: P11P_TIMEOUT_MS); the first
    call of such a session needs the daemon (it times out while the daemon is stopped,
    and is served after)."""
    client, env = (CLIENT_SO, {}) if build == "plain" else (ASAN_CLIENT_SO, sanitized())
    script = FROZEN.format(tests=str(Path(__file__).resolve().parents[1]), client=str(client),
                           pid=p11p.pid)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, **p11p.env, **env, "P11P_TIMEOUT_MS": "1500"})
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["frozen.random"] == "0x30"  # CKR_DEVICE_ERROR: the daemon does not answer
    assert lines["random"] == "0x0 True" and lines["close"] == "0x0"


class _Raw:
    """A connection that speaks the client link by hand (protocol/README.md)."""

    def __init__(self, d: Daemon, features: list[str]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(d.socket))
        answer = self.call({"p11p": 1, "max": 1, "features": features, "ctx": os.urandom(16),
                            "pid": os.getpid(), "prog": "raw"})
        assert answer.get("features") == features, answer
        assert ("max_sessions" in answer) == ("client_open" in features)

    def call(self, frame: object) -> Any:
        body = msgpack.packb(frame)
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            chunk = self.sock.recv(65536)
            assert chunk, "the daemon closed the connection"
            data += chunk
        return msgpack.unpackb(data[4:])


def test_open_at_takes_only_what_it_says(p11p: Daemon) -> None:
    """OPEN_AT: only on a connection that agreed client_open, only in the library's
    range, again for the same session (CKR_OK) but not with other flags; the session it
    opens is one like any other (closed once)."""
    from p11p.daemon.cli import admin_request
    (group,) = admin_request(p11p.socket.with_name(p11p.socket.name + ".admin"),
                             {"cmd": "status"})["groups"]
    slot, h = group["slot"], 0x40000001
    assert _Raw(p11p, ["data_plane"]).call([1008, slot, 4, h, 1]) == [0x54]  # NOT_SUPPORTED
    raw = _Raw(p11p, ["data_plane", "client_open"])
    assert raw.call([1008, slot, 4, 5, 1]) == [0x7]  # ARGUMENTS_BAD: the daemon's range
    assert raw.call([1008, slot, 4, 0x80000000, 1]) == [0x7]
    assert raw.call([1008, slot + 1000, 4, h, 1]) == [0x3]  # SLOT_ID_INVALID
    assert raw.call([1008, slot, 2, h, 1]) == [0xB4]  # SESSION_PARALLEL_NOT_SUPPORTED
    assert raw.call([1008, slot, 4, h, 1]) == [0]
    assert raw.call([1008, slot, 4, h, 1]) == [0]  # again: the same session
    assert raw.call([1008, slot, 6, h, 1]) == [0x7]  # another session's handle
    assert raw.call([1008, slot, 6, h + 1, 0]) == [0]  # made known only
    assert raw.call([14, h]) == [0] and raw.call([14, h + 1]) == [0]
    assert raw.call([14, h]) == [0xB3]  # SESSION_HANDLE_INVALID
