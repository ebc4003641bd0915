"""Versions on the client link (issue 14): the hello negotiates what client and daemon
both speak (protocol/README.md "Client link: hello"), against a real daemon over
SoftHSM2.

- an older client, that sends exactly the first hello (`{"p11p": 1, ...}`, no `max`, no
  `features`), gets the answer it always got and is served;
- a newer client offering 1..5 gets 1 and is served; one offering only 3..5 is refused
  with an error that names both ranges, logged once, and the daemon serves on;
- the real client library works as before, and against a daemon that pretends to speak
  only 3..5 (its range set in its own process before it runs: tests/kit.py `preamble`)
  every call fails CKR_DEVICE_ERROR at once, with the library's one notice saying why.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from kit import CLIENT_SO, Daemon, SoftHSM, one_member_group, wait_for

FN_GET_SLOT_LIST, FN_GET_TOKEN_INFO, FN_OPEN_SESSION, FN_CLOSE_SESSION = 5, 7, 13, 14
CKR_OK, CKR_DEVICE_ERROR = 0, 0x30
CKF_SERIAL_SESSION = 4


class Closed(Exception):
    """The daemon closed the connection."""


class RawClient:
    """A client of the daemon's socket that writes its frames by hand: the hello it is
    told to send, then requests `[code, arg...]` (protocol/README.md)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))

    def close(self) -> None:
        self.sock.close()

    def send(self, obj: Any) -> None:
        body = msgpack.packb(obj, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Closed()
            out += chunk
        return out

    def recv(self) -> Any:
        (size,) = struct.unpack(">I", self._exact(4))
        return msgpack.unpackb(self._exact(size), raw=False)

    def hello(self, **keys: Any) -> Any:
        self.send({**keys, "ctx": os.urandom(16), "pid": os.getpid(), "prog": "raw-client"})
        return self.recv()

    def call(self, *request: Any) -> list[Any]:
        self.send(list(request))
        reply = self.recv()
        assert type(reply) is list and reply and type(reply[0]) is int, reply
        return reply

    def closed(self) -> bool:
        try:
            self.recv()
        except (Closed, ConnectionResetError):
            return True
        return False


def signing_slot(client: RawClient) -> int:
    """C_GetSlotList and C_GetTokenInfo by hand: the slot of the group "signing"."""
    rv, slots = client.call(FN_GET_SLOT_LIST, 1, 16)
    assert rv == CKR_OK and slots, slots
    for slot in slots:
        rv, info = client.call(FN_GET_TOKEN_INFO, slot, 0)
        assert rv == CKR_OK
        if info[0].rstrip(b" ") == b"signing":
            return int(slot)
    raise AssertionError(f"no slot labelled signing in {slots}")


def works(client: RawClient) -> None:
    """A few real calls on a connection after its hello: list, open, close."""
    slot = signing_slot(client)
    rv, session = client.call(FN_OPEN_SESSION, slot, CKF_SERIAL_SESSION, 0)
    assert rv == CKR_OK and session
    assert client.call(FN_CLOSE_SESSION, session) == [CKR_OK]


def warnings(daemon: Daemon, text: str) -> list[str]:
    return [line for line in daemon.log_text().splitlines() if " WARNING " in line and text in line]


def hello_and_work(daemon: Daemon, **hello: object) -> object:
    """A raw client's hello, then calls that must be served; the daemon's answer."""
    client = RawClient(daemon.socket)
    try:
        answer = client.hello(**hello)
        works(client)
        return answer
    finally:
        client.close()


# ---- the daemon this build makes ----

def test_an_older_client_keeps_working(daemon: Daemon) -> None:
    """Exactly the first hello, then calls: the same answer as always, and served."""
    assert hello_and_work(daemon, p11p=1) == {"p11p": 1}


def test_a_newer_client_gets_version_1(daemon: Daemon) -> None:
    answer = hello_and_work(daemon, p11p=1, max=5, features=["later", "someday"],
                            later={"x": 1})
    assert answer == {"p11p": 1, "features": []}


def test_a_client_of_other_versions_is_refused_and_others_are_served(daemon: Daemon,
                                                                      pykcs11_p11p) -> None:  # type: ignore[no-untyped-def]
    why = "no protocol version in common: the client speaks 3..5, this daemon 1"
    for _ in range(3):  # an application that tries on every call: one warning
        client = RawClient(daemon.socket)
        try:
            assert client.hello(p11p=3, max=5) == {"p11p": 1, "max": 1, "error": why}
            assert client.closed()
        finally:
            client.close()
    assert wait_for(lambda: len(warnings(daemon, why)) == 1)
    time.sleep(0.2)
    assert len(warnings(daemon, why)) == 1, daemon.log_text()[-2000:]
    # the daemon serves on: a raw client and the real library
    assert hello_and_work(daemon, p11p=1) == {"p11p": 1}
    slots = pykcs11_p11p.getSlotList(tokenPresent=True)
    assert [pykcs11_p11p.getTokenInfo(s).label.strip() for s in slots] == ["signing"]


def test_the_client_library_works_as_before(pykcs11_p11p) -> None:  # type: ignore[no-untyped-def]
    import PyKCS11
    lib = pykcs11_p11p
    slot = next(s for s in lib.getSlotList(tokenPresent=True)
                if lib.getTokenInfo(s).label.strip() == "signing")
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
    try:
        session.login("1234")
        assert len(session.generateRandom(32)) == 32
        session.logout()
    finally:
        session.closeSession()


# ---- a daemon that pretends to speak only 3..5 ----

PRETEND = ("import p11p.daemon.hello as hello\n"
           "hello.VERSIONS = (3, 5)\n"
           "hello.FEATURES = ('later', 'other')\n")


@pytest.fixture(scope="module")
def pretender(softhsm: SoftHSM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("p11p-3-5"), {
        "signing": one_member_group("signing", softhsm, "tokA"),
    })
    d.start(preamble=PRETEND)
    yield d
    d.stop()


@pytest.mark.parametrize("offer, answer", [
    ({"p11p": 1, "max": 5}, {"p11p": 5}),
    ({"p11p": 1, "max": 4, "features": ["other", "x"]}, {"p11p": 4, "features": ["other"]}),
    ({"p11p": 5, "max": 9, "features": []}, {"p11p": 5, "features": []}),
])
def test_the_newest_version_both_speak(pretender: Daemon, offer: dict[str, Any],
                                       answer: dict[str, Any]) -> None:
    client = RawClient(pretender.socket)
    try:
        assert client.hello(**offer) == answer
    finally:
        client.close()


@pytest.mark.parametrize("offer, speaks", [({"p11p": 1}, "1"), ({"p11p": 1, "max": 2}, "1..2"),
                                           ({"p11p": 6, "max": 8}, "6..8")])
def test_ranges_that_do_not_meet(pretender: Daemon, offer: dict[str, Any], speaks: str) -> None:
    client = RawClient(pretender.socket)
    try:
        answer = client.hello(**offer)
        assert answer == {"p11p": 3, "max": 5, "error": "no protocol version in common: "
                          f"the client speaks {speaks}, this daemon 3..5"}
        assert client.closed()
    finally:
        client.close()


APP = r"""
import sys
import time

import PyKCS11

lib = PyKCS11.PyKCS11Lib()
lib.load(sys.argv[1])
for _ in range(3):
    start = time.monotonic()
    try:
        lib.getSlotList()
        print("ok")
    except PyKCS11.PyKCS11Error as exc:
        print("rv", hex(exc.value), "fast" if time.monotonic() - start < 5 else "slow")
print("done")
"""


def test_the_client_library_fails_cleanly_against_a_daemon_of_other_versions(
        pretender: Daemon) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P11P_")}
    env["P11P_SOCKET"] = str(pretender.socket)
    app = subprocess.run([sys.executable, "-c", APP, str(CLIENT_SO)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert app.returncode == 0, app.stdout + app.stderr
    assert app.stdout.splitlines() == ["rv 0x30 fast"] * 3 + ["done"], app.stdout + app.stderr
    why = "no protocol version in common: the client speaks 1, this daemon 3..5"
    assert app.stderr.splitlines() == [
        f"p11p-client: cannot reach the p11p daemon at {pretender.socket} (the daemon "
        f"refused the hello: {why}); run 'p11p doctor'"], app.stderr
    assert wait_for(lambda: len(warnings(pretender, why)) == 1)
    assert pretender.proc is not None and pretender.proc.poll() is None
