"""The client's transport against a fake daemon (tests/client/fakedaemon.py), driven by a
C application (tests/client/driver.c): daemon absent, reconnect, hello, malformed
replies, time-outs, concurrency over a pool of connections, fork(), C_Initialize's
arguments, and C_Finalize unblocking C_WaitForSlotEvent. Tests marked with `variant`
run against both the plain and the ASan/UBSan build."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
from clientbuild import SANITIZER_ENV, TRANSPORT_TEST_SOURCES, compile_c, sanitizer_report
from clientfixtures import *  # noqa: F403  (the fixtures)
from fakedaemon import (
    FN_FINALIZE,
    FN_GET_SLOT_LIST,
    FN_WAIT_FOR_SLOT_EVENT,
    Close,
    Conn,
    Delay,
    FakeDaemon,
    Raw,
    default_handler,
    frame,
)

CKR_OK = 0x0
CKR_ARGUMENTS_BAD = 0x7
CKR_NO_EVENT = 0x8
CKR_DEVICE_ERROR = 0x30
CKR_FUNCTION_NOT_PARALLEL = 0x51
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191


# ---- daemon absent, reconnect ----

def test_daemon_absent_is_a_prompt_device_error(start_driver, sock: Path, variant: str) -> None:
    """No daemon: C_GetSlotList lists no slot at once (as p11-kit's client does, so
    loaders of many modules keep the others); a call on a session fails at once."""
    d = start_driver(variant)
    assert d.cmd("init").rv == CKR_OK  # C_Initialize needs no daemon
    r = d.cmd("slots")
    assert (r.rv, r["count"]) == (CKR_OK, "0") and r.num("ms") < 1000
    assert d.cmd("sign").rv == CKR_DEVICE_ERROR
    # a stale socket file that nobody listens on
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    r = d.cmd("slots")
    assert (r.rv, r["count"]) == (CKR_OK, "0") and r.num("ms") < 1000
    assert d.cmd("sign").rv == CKR_DEVICE_ERROR
    assert d.cmd("finalize").rv == CKR_OK


def test_reconnects_when_the_daemon_is_back(start_driver, sock: Path) -> None:
    d = start_driver()
    assert d.cmd("init").rv == CKR_OK
    r = d.cmd("slots")
    assert (r.rv, r["count"]) == (CKR_OK, "0")
    daemon = FakeDaemon(sock)
    daemon.start()
    r = d.cmd("slots")
    assert (r.rv, r["count"]) == (CKR_OK, "1")
    assert d.cmd("slots")["count"] == "1"  # the pooled connection is reused
    daemon.stop()  # the daemon goes away: its connections close
    r = d.cmd("slots")
    assert (r.rv, r["count"]) == (CKR_OK, "0")
    assert d.cmd("sign").rv == CKR_DEVICE_ERROR
    daemon = FakeDaemon(sock)
    daemon.start()
    r = d.cmd("slots")
    assert (r.rv, r["count"]) == (CKR_OK, "1")
    # restarted while the client held an idle connection: the next call still works
    daemon.stop()
    daemon = FakeDaemon(sock)
    daemon.start()
    assert d.cmd("slots").rv == CKR_OK
    assert d.cmd("finalize").rv == CKR_OK
    daemon.stop()


# ---- hello ----

def test_hello_carries_context_pid_and_program(start_driver, sock: Path) -> None:
    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        return Delay(0.2, default_handler(conn, request))  # so three calls overlap

    with FakeDaemon(sock, handler) as daemon:
        d = start_driver()
        d.cmd("init")
        d.cmd("threads 3")
        hellos = [c.hello for c in daemon.conns]
        assert len(hellos) == 3
        for h in hellos:
            assert h is not None and set(h) == {"p11p", "max", "features", "ctx", "pid", "prog"}
            # the versions it speaks, oldest in p11p (protocol/README.md "Client link: hello")
            assert (h["p11p"], h["max"], h["features"]) == (1, 1, ["data_plane", "client_open", "restart", "resume", "cpu_hint", "plane_pairs", "plane_mailbox"])
            assert h["pid"] == d.pid and "driver" in h["prog"]
            assert isinstance(h["ctx"], bytes) and len(h["ctx"]) == 16
        assert len({h["ctx"] for h in hellos if h}) == 1  # one context for all sockets
        d.cmd("finalize")
        d.cmd("init")
        d.cmd("slots")
        assert daemon.conns[-1].hello["ctx"] != hellos[0]["ctx"]  # a new C_Initialize, a new id


@pytest.mark.parametrize("mode", ["refuse", "version2", {"p11p": 0}, {"p11p": "1"}, {"max": 1},
                                  {"p11p": 2, "features": []}])
def test_hello_refused_or_other_version(start_driver, sock: Path, mode: str) -> None:
    with FakeDaemon(sock, hello=mode):
        d = start_driver()
        d.cmd("init")
        assert d.cmd("slots").rv == CKR_DEVICE_ERROR


@pytest.mark.parametrize("answer", [
    {"p11p": 1},  # a daemon older than the negotiation
    {"p11p": 1, "features": []},
    {"p11p": 1, "features": ["later", 7, None, {"x": 1}]},  # features it does not know
    {"p11p": 1, "max": 9, "later": [1, 2]},  # keys it does not know
])
def test_hello_answers_of_older_and_newer_daemons(start_driver, sock: Path, variant: str,
                                                  answer: dict[str, object]) -> None:
    with FakeDaemon(sock, hello=answer):
        d = start_driver(variant)
        d.cmd("init")
        r = d.cmd("slots")
        assert r.rv == CKR_OK and r["count"] != "0"
        assert d.cmd("finalize").rv == CKR_OK


def test_hello_refused_for_versions_says_why_once(start_driver, sock: Path, variant: str) -> None:
    """A daemon that speaks no version of ours: every call fails CKR_DEVICE_ERROR, and the
    one notice carries the daemon's words (both ranges)."""
    why = "no protocol version in common: the client speaks 1, this daemon 3..5"
    with FakeDaemon(sock, hello={"p11p": 3, "max": 5, "error": why + "\x1b[31m"}) as daemon:
        d = start_driver(variant)
        d.cmd("init")
        assert d.cmd("slots").rv == CKR_DEVICE_ERROR
        assert d.cmd("slots").rv == CKR_DEVICE_ERROR
        assert len(daemon.conns) == 2
        d.cmd("finalize")
        d.close()
    deadline = time.monotonic() + 5  # stderr is read by a thread of its own
    while None not in d.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    notices = [line for line in d.stderr if line and line.startswith("p11p-client:")]
    assert notices == [f"p11p-client: cannot reach the p11p daemon at {sock} (the daemon "
                       f"refused the hello: {why}?[31m); run 'p11p doctor'"], d.stderr


def test_hello_time_out(start_driver, sock: Path) -> None:
    with FakeDaemon(sock, hello="silent"):
        d = start_driver(P11P_TIMEOUT_MS="300")
        d.cmd("init")
        r = d.cmd("slots")
        assert r.rv == CKR_DEVICE_ERROR and 250 <= r.num("ms") < 2000


# ---- malformed replies ----

def _body(b: bytes) -> Raw:
    return Raw(struct.pack(">I", len(b)) + b)


MALFORMED = {
    "not-msgpack": _body(b"\xc1\xc1"),
    "truncated-msgpack": _body(b"\x92\x00"),
    "trailing-bytes": _body(msgpack.packb([0, 1]) + b"\x00"),
    "not-an-array": _body(msgpack.packb({"rv": 0})),
    "count-as-str": _body(msgpack.packb([0, "1"])),
    "too-many-outputs": _body(msgpack.packb([0, 1, 2])),
    "empty-frame": Raw(b"\x00\x00\x00\x00"),
    "frame-over-64MiB": Raw(struct.pack(">I", 64 * 1024 * 1024 + 1)),
    "huge-frame-4GiB": Raw(b"\xff\xff\xff\xff"),
    "frame-cut-short": Raw(struct.pack(">I", 100) + b"\x92\x00", close=True),
    "closed-without-reply": Close(),
    # a reply and a frame past it, in one write: one request has one reply (the next
    # call on that connection would read the stray one)
    "two-frames": Raw(frame([CKR_OK, 7]) + frame([CKR_OK, 8])),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_reply_then_next_call_works(start_driver, sock: Path, case: str) -> None:
    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        if conn.number == 1 and request[0] == FN_GET_SLOT_LIST:
            return MALFORMED[case]
        return default_handler(conn, request)

    with FakeDaemon(sock, handler) as daemon:
        d = start_driver()
        d.cmd("init")
        r = d.cmd("slots", timeout=10)
        assert r.rv == CKR_DEVICE_ERROR and r.num("ms") < 2000
        r = d.cmd("slots")
        assert (r.rv, r["count"]) == (CKR_OK, "2")  # a new connection
        assert daemon.wait_for(daemon.conns[0].closed.is_set)  # the bad one was dropped


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan"])
def test_a_pair_s_two_replies_however_they_are_cut(tmp_path: Path, sanitize: bool) -> None:
    """tests/client/transport_test.c: p11p_recv_two reads a data-plane pair's replies
    sent at once, cut at every byte, the rest later; bytes past the two, a peer that
    closes mid-frame and a zero-length frame fail the call (CKR_DEVICE_ERROR), with
    nothing left allocated."""
    exe = compile_c(tmp_path / "transport_test", TRANSPORT_TEST_SOURCES, sanitize, ["-lmsgpackc"])
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **SANITIZER_ENV})
    assert done.returncode == 0 and not sanitizer_report(done.stderr), done.stdout + done.stderr
    assert "checks, 0 failed" in done.stdout


RETRY = frame([0xF0110002])  # a daemon that stops for a restart (daemon/server.py RETRY)


@pytest.mark.parametrize("case", ["whole", "first-bytes", "without-restart"])
def test_a_retry_behind_a_reply_closes_the_connection_not_the_call(start_driver, sock: Path,
                                                                    case: str) -> None:
    """A daemon that stops for a restart writes RETRY on each idle connection as it closes
    it; behind a reply the application had not read yet, both come in one recv. The call
    takes its reply and the connection is not used again; the next call makes a new one.
    Without the link feature restart, bytes past a reply are a broken peer, as before."""
    behind = RETRY[:6] if case == "first-bytes" else RETRY

    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        if conn.number == 1 and request[0] == FN_GET_SLOT_LIST:
            return Raw(frame([CKR_OK, 1]) + behind, close=case == "first-bytes")
        return default_handler(conn, request)

    features = [] if case == "without-restart" else ["restart"]
    with FakeDaemon(sock, handler, hello={"p11p": 1, "features": features}) as daemon:
        d = start_driver("asan")
        d.cmd("init")
        r = d.cmd("slots", timeout=10)
        if case == "without-restart":
            assert r.rv == CKR_DEVICE_ERROR
        else:
            assert (r.rv, r["count"]) == (CKR_OK, "1")
        assert daemon.wait_for(daemon.conns[0].closed.is_set)  # not given back to the pool
        r = d.cmd("slots")
        assert (r.rv, r["count"]) == (CKR_OK, "2")  # a new connection
        assert d.cmd("finalize").rv == CKR_OK


def test_malformed_replies_under_sanitizers(start_driver, sock: Path) -> None:
    cases = sorted(MALFORMED)

    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        if request[0] == FN_GET_SLOT_LIST and conn.number <= len(cases):
            return MALFORMED[cases[conn.number - 1]]
        return default_handler(conn, request)

    with FakeDaemon(sock, handler):
        d = start_driver("asan")
        d.cmd("init")
        for _ in cases:
            assert d.cmd("slots").rv == CKR_DEVICE_ERROR
        assert d.cmd("slots").rv == CKR_OK
        assert d.cmd("finalize").rv == CKR_OK


def test_reply_data_longer_than_the_buffer(start_driver, sock: Path) -> None:
    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        return [CKR_OK, b"x" * (request[-1] + 1)]

    with FakeDaemon(sock, handler):
        d = start_driver("asan")
        d.cmd("init")
        r = d.cmd("sign 16")
        assert (r.rv, r["len"]) == (CKR_DEVICE_ERROR, "16")


# ---- time-outs ----

def test_reply_time_out_from_env(start_driver, sock: Path) -> None:
    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        if conn.number == 1 and request[0] == FN_GET_SLOT_LIST:
            return Delay(3, [CKR_OK, 99])
        return default_handler(conn, request)

    with FakeDaemon(sock, handler):
        d = start_driver(P11P_TIMEOUT_MS="300")
        d.cmd("init")
        r = d.cmd("slots")
        assert r.rv == CKR_DEVICE_ERROR and 250 <= r.num("ms") < 1500
        r = d.cmd("slots")
        assert (r.rv, r["count"]) == (CKR_OK, "2")


def test_no_reply_time_out_by_default(start_driver, sock: Path) -> None:
    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        return Delay(1.2, default_handler(conn, request))

    with FakeDaemon(sock, handler):
        d = start_driver()
        d.cmd("init")
        r = d.cmd("slots")
        assert r.rv == CKR_OK and r.num("ms") >= 1100


# ---- concurrency ----

def test_threads_run_concurrently_on_several_connections(start_driver, sock: Path,
                                                         variant: str) -> None:
    delay = 0.5

    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        return Delay(delay, default_handler(conn, request))

    with FakeDaemon(sock, handler) as daemon:
        d = start_driver(variant)
        d.cmd("init")
        r = d.cmd("threads 8")
        assert set(r["rvs"].split(",")) == {"0x0"}
        used = set(r["counts"].split(","))
        assert len(used) == 8  # one connection per concurrent call
        assert r.num("ms") < (2 * delay + 0.6) * 1000  # ~1 delay, not 8
        # the connections stay pooled: a second wave makes no new ones
        r = d.cmd("threads 8")
        assert set(r["counts"].split(",")) <= used and len(daemon.conns) == 8


# ---- fork ----

def test_fork_child_starts_over_and_parent_is_untouched(start_driver, sock: Path,
                                                        variant: str) -> None:
    with FakeDaemon(sock) as daemon:
        d = start_driver(variant)
        d.cmd("init")
        assert d.cmd("slots")["count"] == "1"
        r = d.cmd("fork slots;init;slots;slots;finalize")
        assert r["status"] == "0"
        child = r.child
        assert child[0].rv == CKR_CRYPTOKI_NOT_INITIALIZED
        assert child[1].rv == CKR_OK
        assert (child[2].rv, child[2]["count"]) == (CKR_OK, "2")  # a new connection
        assert child[3]["count"] == "2"
        assert child[4].rv == CKR_OK
        parent, kid = daemon.conns[0], daemon.conns[1]
        assert kid.hello["ctx"] != parent.hello["ctx"]
        assert kid.hello["pid"] != parent.hello["pid"] == d.pid
        # the parent's connection carried only the parent's call and is still open
        assert [q[0] for q in parent.requests] == [FN_GET_SLOT_LIST]
        assert not parent.closed.is_set()
        assert [q[0] for q in kid.requests] == [FN_GET_SLOT_LIST, FN_GET_SLOT_LIST, FN_FINALIZE]
        r = d.cmd("slots")
        assert (r.rv, r["count"]) == (CKR_OK, "1")  # the parent goes on on its own connection
        assert len(parent.requests) == 2
        # a child that exits without C_Finalize does not close or use the parent's socket
        assert d.cmd("fork slots")["status"] == "0"
        assert d.cmd("slots")["count"] == "1"
        assert len(daemon.conns) == 2 and len(parent.requests) == 3


def test_a_child_made_without_fork_handlers_is_refused_until_it_initializes(
        start_driver, sock: Path, variant: str) -> None:
    """A raw clone() runs no fork handlers: the library's own guard (a page the kernel
    zeroes in a child, client/state.c) refuses the child's calls, C_Finalize included,
    until its C_Initialize; the parent's connection carries none of them."""
    with FakeDaemon(sock) as daemon:
        d = start_driver(variant)
        d.cmd("init")
        assert d.cmd("slots")["count"] == "1"
        r = d.cmd("clone slots;finalize;init;slots;finalize")
        assert r["status"] == "0"
        child = r.child
        assert [c.rv for c in child] == [CKR_CRYPTOKI_NOT_INITIALIZED] * 2 + [CKR_OK] * 3
        parent = daemon.conns[0]
        assert [q[0] for q in parent.requests] == [FN_GET_SLOT_LIST]
        assert d.cmd("slots")["count"] == "1"
        assert len(parent.requests) == 2


# ---- C_Initialize, C_Finalize, local functions ----

def test_initialize_arguments_and_local_functions(start_driver, variant: str) -> None:
    d = start_driver(variant)
    assert d.cmd("slots").rv == CKR_CRYPTOKI_NOT_INITIALIZED
    assert d.cmd("info").rv == CKR_CRYPTOKI_NOT_INITIALIZED
    assert d.cmd("finalize").rv == CKR_CRYPTOKI_NOT_INITIALIZED
    assert d.cmd("init-args partial").rv == CKR_ARGUMENTS_BAD
    assert d.cmd("init-args reserved").rv == CKR_ARGUMENTS_BAD
    assert d.cmd("slots").rv == CKR_CRYPTOKI_NOT_INITIALIZED
    for args in ("none", "os", "callbacks-os"):
        assert d.cmd(f"init-args {args}").rv == CKR_OK
        assert d.cmd("init").rv == CKR_CRYPTOKI_ALREADY_INITIALIZED
        assert d.cmd("finalize-reserved").rv == CKR_ARGUMENTS_BAD
        assert d.cmd("finalize").rv == CKR_OK
    assert d.cmd("locks")["creates"] == "0"  # the OS flag: no application mutexes
    assert d.cmd("init").rv == CKR_OK
    r = d.cmd("info")
    assert (r.rv, r["version"]) == (CKR_OK, "2.40")
    assert d.cmd("status").rv == CKR_FUNCTION_NOT_PARALLEL
    d.cmd("finalize")


def test_initialize_with_application_mutexes(start_driver, sock: Path) -> None:
    # callbacks without CKF_OS_LOCKING_OK: the library must lock with them
    with FakeDaemon(sock):
        d = start_driver()
        assert d.cmd("init-args callbacks").rv == CKR_OK
        assert d.cmd("locks")["creates"] == "1"
        assert d.cmd("threads 4")["rvs"] == "0x0,0x0,0x0,0x0"
        r = d.cmd("locks")
        assert int(r["locks"]) >= 8 and r["locks"] == r["unlocks"]
        assert d.cmd("finalize").rv == CKR_OK
        assert d.cmd("locks")["destroys"] == "1"


def test_finalize_tells_the_daemon(start_driver, sock: Path) -> None:
    with FakeDaemon(sock) as daemon:
        d = start_driver()
        d.cmd("init")
        d.cmd("slots")
        assert d.cmd("finalize").rv == CKR_OK
        conn = daemon.conns[0]
        assert daemon.wait_for(conn.closed.is_set)
        assert [q for q in conn.requests] == [[FN_GET_SLOT_LIST, 1, None], [FN_FINALIZE]]
        assert d.cmd("slots").rv == CKR_CRYPTOKI_NOT_INITIALIZED


def test_finalize_unblocks_wait_for_slot_event(start_driver, sock: Path, variant: str) -> None:
    with FakeDaemon(sock) as daemon:
        d = start_driver(variant)
        d.cmd("init")
        assert d.cmd("wait-nb").rv == CKR_NO_EVENT  # CKF_DONT_BLOCK: answered at once
        d.cmd("wait-bg")  # holds the pooled connection, blocked in the daemon
        assert daemon.wait_for(lambda: any(q[0] == FN_WAIT_FOR_SLOT_EVENT and q[1] == 0
                                           for c in daemon.conns for q in c.requests))
        assert d.cmd("slots")["count"] == "2"  # meanwhile other calls use another connection
        d.cmd("sleep 200")
        r = d.cmd("finalize")
        assert r.rv == CKR_OK and r.num("ms") < 2000
        w = d.cmd("wait-join")
        assert w.rv == CKR_CRYPTOKI_NOT_INITIALIZED and w.num("ms") >= 200
        waiting, idle = daemon.conns
        assert daemon.wait_for(lambda: waiting.closed.is_set() and idle.closed.is_set())
        assert idle.requests[-1] == [FN_FINALIZE]
        # and the library can start again
        assert d.cmd("init").rv == CKR_OK
        assert d.cmd("slots").rv == CKR_OK


def test_sigpipe_never_kills_the_application(start_driver, sock: Path) -> None:
    # the daemon closes the socket before the request is written: EPIPE, not SIGPIPE
    with FakeDaemon(sock, lambda conn, req: Close()):
        d = start_driver()
        d.cmd("init")
        for _ in range(5):
            assert d.cmd("slots").rv == CKR_DEVICE_ERROR
        assert d.proc.poll() is None


def test_frame_helpers_match_the_protocol() -> None:
    # the fake daemon frames as protocol/README.md says: 4-byte big-endian length + body
    assert frame([0]) == b"\x00\x00\x00\x02\x91\x00"
    assert os.path.basename(__file__).startswith("test_client_")


# ---- what the library keeps for a restarted daemon (client/kept.c) ----

FN_SET_PIN, FN_OPEN_SESSION, FN_CLOSE_SESSION, FN_LOGIN, FN_LOGOUT = 12, 13, 14, 19, 20


def test_hellos_carry_the_key_and_the_login_the_library_keeps(start_driver, sock: Path,
                                                              variant: str) -> None:
    """With the link feature resume, the key of the hello's answer and the application's
    login (following C_SetPIN; ended by C_Logout and by closing the slot's last
    session; never a context-specific one) travel in every later hello, and nothing
    after C_Finalize. Each step is followed by a daemon restart, so the next call makes
    a new connection."""
    key = bytes(range(32))

    def handler(conn: Conn, request: list) -> object:  # type: ignore[type-arg]
        if request[0] == FN_OPEN_SESSION:
            return [CKR_OK, 7]
        if request[0] in (FN_SET_PIN, FN_CLOSE_SESSION, FN_LOGIN, FN_LOGOUT):
            return [CKR_OK]
        return default_handler(conn, request)

    answer = {"p11p": 1, "features": ["restart", "resume"], "key": key}
    with FakeDaemon(sock, handler, hello=answer) as daemon:
        d = start_driver(variant)

        def resume_after(command: str) -> object:
            assert d.cmd(command).rv == CKR_OK, command
            daemon.stop()
            daemon.start()
            assert d.cmd("slots").rv == CKR_OK
            return daemon.conns[-1].hello.get("resume")  # type: ignore[union-attr]

        assert d.cmd("init").rv == CKR_OK
        assert d.cmd("open 3")["session"] == "7"
        assert "resume" not in daemon.conns[0].hello  # type: ignore[operator]
        assert resume_after("login 7 1234") == {"key": key, "logins": [[3, 1, b"1234"]]}
        assert resume_after("login-context 7 5555") == {"key": key, "logins": [[3, 1, b"1234"]]}
        assert resume_after("setpin 7 1234 98765") == {"key": key,
                                                        "logins": [[3, 1, b"98765"]]}
        assert resume_after("logout 7") == {"key": key, "logins": []}
        assert resume_after("login-so 7 0000") == {"key": key, "logins": [[3, 0, b"0000"]]}
        assert resume_after("close 7") == {"key": key, "logins": []}  # the slot's last one
        assert d.cmd("finalize").rv == CKR_OK
        assert resume_after("init") is None  # C_Finalize wiped it all
        assert d.cmd("finalize").rv == CKR_OK
