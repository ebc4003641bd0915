"""The helper's direct path (helper/fast.c), driven as the daemon drives it: start the
listener, allow a member session, then calls straight on the socket as the client
library makes them. Signatures verify; a revoked id is refused; a wrong token, a
malformed or truncated frame closes that connection and nothing else (the helper still
answers, on the pipe and on new connections)."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterator
from hashlib import sha256
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from helperfixtures import *  # noqa: F403  (the fixtures)
from helperlink import FALSE, TRUE, HelperLink, closed, recv_exact, template
from p11p.protocol.constants import CKA, CKM, CKR

FAST_START, FAST_ALLOW, FAST_REVOKE, FAST_SERVED = -2, -3, -4, -5
SIGN_INIT, SIGN, GENERATE_KEY_PAIR, GENERATE_RANDOM = 43, 44, 60, 65
DIGEST_INIT, DIGEST = 38, 39
GENERATE_KEY = 59  # not on the data plane (functions.spec has no @direct for it)
P256 = bytes.fromhex("06082a8648ce3d030107")


class Fast:
    """One helper with its listener started, a logged-in session allowed, an EC key."""

    def __init__(self, helper: HelperLink) -> None:
        self.helper = helper
        self.name = b"p11p-direct-test-" + secrets.token_hex(6).encode()
        self.token = secrets.token_bytes(16)
        assert helper.call(FAST_START, self.name, self.token, os.getuid()) == [CKR["CKR_OK"]]
        slot = helper.token_slot()
        self.session = helper.open_session(slot)
        pub, priv = helper.ok(GENERATE_KEY_PAIR, self.session, [CKM["CKM_EC_KEY_PAIR_GEN"], None],
                              template(TOKEN=FALSE, EC_PARAMS=P256, VERIFY=TRUE),
                              template(TOKEN=FALSE, PRIVATE=TRUE, SIGN=TRUE), 0, 0)
        der = helper.get_attributes(self.session, pub, [CKA["CKA_EC_POINT"]])[CKA["CKA_EC_POINT"]]
        self.public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), der[2:])
        self.key = int(priv)
        (self.id,) = helper.ok(FAST_ALLOW, self.session)

    def connect(self, token: bytes | None = None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(b"\0" + self.name)
        s.sendall(self.token if token is None else token)
        return s


def call(s: socket.socket, *request: Any) -> list[Any]:
    body = msgpack.packb(list(request), use_bin_type=True)
    s.sendall(struct.pack(">I", len(body)) + body)
    size = struct.unpack(">I", recv_exact(s, 4))[0]
    reply: list[Any] = msgpack.unpackb(recv_exact(s, size), raw=False)
    return reply


@pytest.fixture
def fast(spawn: Callable[..., HelperLink]) -> Iterator[Fast]:
    yield Fast(spawn())


def test_sign_and_random_on_the_direct_socket(fast: Fast) -> None:
    with fast.connect() as s:
        rv, data = call(s, GENERATE_RANDOM, fast.id, 48)
        assert rv == 0 and len(data) == 48 and data != bytes(48)
        for i in range(20):
            digest = sha256(b"message %d" % i).digest()
            assert call(s, SIGN_INIT, fast.id, [CKM["CKM_ECDSA"], None], fast.key) == [0]
            assert call(s, SIGN, fast.id, digest, None) == [0, 64]  # the length first
            assert call(s, SIGN, fast.id, digest, 10) == [CKR["CKR_BUFFER_TOO_SMALL"], 64]
            rv, sig = call(s, SIGN, fast.id, digest, 200)
            assert rv == 0 and len(sig) == 64
            der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                             int.from_bytes(sig[32:], "big"))
            fast.public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        # the operation ended: the module says so
        assert call(s, SIGN, fast.id, b"x", 64) == [CKR["CKR_OPERATION_NOT_INITIALIZED"]]
        # errors of the module come back as they are
        assert call(s, SIGN_INIT, fast.id, [CKM["CKM_ECDSA"], None], 0xdead) == [
            CKR["CKR_OBJECT_HANDLE_INVALID"]]  # SoftHSM2 says so for a key handle
        # functions the direct path does not serve
        assert call(s, GENERATE_KEY, fast.id, [CKM["CKM_AES_KEY_GEN"], None], [], 0) == [
            CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
    rv, served = fast.helper.call(FAST_SERVED)
    assert rv == 0 and served == 1 + 20 * 4 + 2


def test_a_revoked_id_is_refused(fast: Fast) -> None:
    with fast.connect() as s:
        assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0
        assert fast.helper.call(FAST_REVOKE, fast.id) == [0]
        assert call(s, GENERATE_RANDOM, fast.id, 8) == [CKR["CKR_SESSION_HANDLE_INVALID"]]
        assert call(s, GENERATE_RANDOM, 0, 8) == [CKR["CKR_SESSION_HANDLE_INVALID"]]
        (again,) = fast.helper.ok(FAST_ALLOW, fast.session)
        assert again != fast.id  # never the same id twice
        assert call(s, GENERATE_RANDOM, fast.id, 8) == [CKR["CKR_SESSION_HANDLE_INVALID"]]
        assert call(s, GENERATE_RANDOM, again, 8)[0] == 0


def test_a_second_start_hands_the_listener_to_another_application(fast: Fast) -> None:
    """A helper recycled for the next application (daemon: HelperPool.recycle) gets a new
    token and uid on the same name: the connections of the one before are shut, its
    bound sessions end, and its token no longer connects; the new one's work."""
    old = fast.connect()
    assert call(old, GENERATE_RANDOM, fast.id, 8)[0] == 0
    other = fast.connect()  # connected, no call yet
    token = secrets.token_bytes(16)
    assert fast.helper.call(FAST_START, fast.name, token, os.getuid()) == [CKR["CKR_OK"]]
    assert closed(old) and closed(other)
    with fast.connect() as s:  # the old token
        assert closed(s)
    with fast.connect(token) as s:
        assert call(s, GENERATE_RANDOM, fast.id, 8) == [CKR["CKR_SESSION_HANDLE_INVALID"]]
        (again,) = fast.helper.ok(FAST_ALLOW, fast.session)
        assert call(s, GENERATE_RANDOM, again, 8)[0] == 0
        # nobody's uid (as the daemon leaves a helper between applications): no
        # connection of this uid is kept or taken, whatever its token
        assert fast.helper.call(FAST_START, fast.name, token, 0xFFFFFFFF) == [CKR["CKR_OK"]]
        assert closed(s)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # closed at accept: another uid
    with s:
        s.settimeout(10)
        s.connect(b"\0" + fast.name)
        try:
            s.sendall(token)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed already
        assert closed(s)
    # the listener keeps its name
    assert fast.helper.call(FAST_START, b"another-name", token, os.getuid()) == \
        [CKR["CKR_FUNCTION_FAILED"]]
    assert fast.helper.call(-1)[0] == 0


@pytest.mark.parametrize("token", [b"", b"\0" * 15, b"\0" * 16, b"wrong token, 16b"])
def test_a_connection_without_the_token_is_closed(fast: Fast, token: bytes) -> None:
    with fast.connect(token) as s:
        body = msgpack.packb([GENERATE_RANDOM, fast.id, 8])
        try:
            s.sendall(struct.pack(">I", len(body)) + body)
            if len(token) < 16:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed already
        assert closed(s)
    assert fast.helper.call(-1)[0] == 0


# (an empty frame asks for the connection's mailbox: test_helper_mailbox.py)
@pytest.mark.parametrize("body", [
    b"\x91\x41",                                    # [65]: no id
    b"\x93\x41",                                    # truncated array
    b"\x93\x41\xcf\x00\x00",                        # truncated integer
    b"\x94\x2c\x01\xc6\xff\xff\xff\xff\x40",        # bin longer than the frame
    b"\xde\x00\x01\x01\x01",                        # a map
    b"\xc0",                                        # nil
])
def test_a_frame_that_does_not_parse_closes_the_connection(fast: Fast, body: bytes) -> None:
    with fast.connect() as s:
        s.sendall(struct.pack(">I", len(body)) + body)
        answer = b""
        try:
            answer = s.recv(100)
        except ConnectionResetError:
            pass
        if answer:  # an answer is an error answer, never a served call
            reply = msgpack.unpackb(answer[4:], raw=False)
            assert reply[0] != 0, reply
    with fast.connect() as s:  # the helper serves on
        assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0


def test_arguments_the_module_is_given_or_refused_as_on_the_pipe(fast: Fast) -> None:
    """Well-formed requests get the answer the helper's pipe gives them: a NULL
    mechanism goes to the module (which refuses it), more random bytes than a reply
    can carry are CKR_HOST_MEMORY."""
    with fast.connect() as s:
        bad = CKR["CKR_ARGUMENTS_BAD"]
        assert call(s, SIGN_INIT, fast.id, None, fast.key) == [bad]
        assert fast.helper.call(SIGN_INIT, fast.session, None, fast.key) == [bad]
        host_memory = CKR["CKR_HOST_MEMORY"]
        assert call(s, GENERATE_RANDOM, fast.id, 1 << 40) == [host_memory]
        assert fast.helper.call(GENERATE_RANDOM, fast.session, 1 << 40) == [host_memory]
        assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0


@pytest.mark.parametrize("args", [
    (GENERATE_RANDOM, "id", 8, 9),                              # one argument too many
    (GENERATE_RANDOM, "id"),                                    # one too few
    (SIGN, "id", "text", 64),                                   # str where bin goes
    (SIGN, "id", b"x", -1),                                     # a negative capacity
    (SIGN, "id", b"x", True),                                   # a boolean capacity
    (SIGN_INIT, "id", [CKM["CKM_ECDSA"], [1, 2]], "key"),       # fields, no structure
    (SIGN_INIT, "id", [CKM["CKM_ECDSA"]], "key"),               # [type] alone
    (SIGN_INIT, "id", [CKM["CKM_ECDSA"], None], b"key"),        # bin where a handle goes
])
def test_arguments_of_the_wrong_shape_close_the_connection(fast: Fast, args: tuple[Any, ...]) -> None:
    """The client library never sends such a request: it is a protocol error, and the
    connection closes without a call to the module; the helper serves on."""
    request = [{"id": fast.id, "key": fast.key}.get(a, a) if isinstance(a, str) else a
               for a in args]
    with fast.connect() as s:
        body = msgpack.packb(request, use_bin_type=True)
        s.sendall(struct.pack(">I", len(body)) + body)
        assert closed(s)
    with fast.connect() as s:
        assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0


def test_a_request_larger_than_one_read_is_served(fast: Fast) -> None:
    """A request comes in one read when it is small (header and body together); a larger
    one takes more reads and is served the same: the SHA-256 of 20 kB is the digest."""
    message = secrets.token_bytes(20_000)
    with fast.connect() as s:
        assert call(s, DIGEST_INIT, fast.id, [CKM["CKM_SHA256"], None]) == [0]
        assert call(s, DIGEST, fast.id, message, 64) == [0, sha256(message).digest()]
        assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0


def _frame(*request: Any) -> bytes:
    body = msgpack.packb(list(request), use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _reply(s: socket.socket) -> list[Any]:
    size = struct.unpack(">I", recv_exact(s, 4))[0]
    reply: list[Any] = msgpack.unpackb(recv_exact(s, size), raw=False)
    return reply


def test_a_pair_sent_at_once_is_answered_in_order(fast: Fast) -> None:
    """An operation's init and its next call in one send (the client's deferred init:
    protocol/README.md, Data plane): served in order, both replies in one send; the
    signature verifies. Then three requests at once, and the connection serves on."""
    digest = sha256(b"a pair").digest()
    with fast.connect() as s:
        s.sendall(_frame(SIGN_INIT, fast.id, [CKM["CKM_ECDSA"], None], fast.key)
                  + _frame(SIGN, fast.id, digest, 64))
        assert _reply(s) == [0]
        rv, signature = _reply(s)
        assert rv == 0
        fast.public.verify(utils.encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                                      int.from_bytes(signature[32:], "big")),
                           digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        s.sendall(b"".join(_frame(GENERATE_RANDOM, fast.id, n) for n in (8, 16, 24)))
        assert [len(_reply(s)[1]) for _ in range(3)] == [8, 16, 24]
        assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0


def test_a_pair_whose_init_fails_answers_both(fast: Fast) -> None:
    """The init refused (a key handle the module does not know: SoftHSM2 says
    CKR_OBJECT_HANDLE_INVALID): its error, then the call's CKR_OPERATION_NOT_INITIALIZED;
    the client answers the init's."""
    with fast.connect() as s:
        s.sendall(_frame(SIGN_INIT, fast.id, [CKM["CKM_ECDSA"], None], fast.key + 999)
                  + _frame(SIGN, fast.id, b"x" * 32, 64))
        assert _reply(s)[0] == CKR["CKR_OBJECT_HANDLE_INVALID"]
        assert _reply(s)[0] == CKR["CKR_OPERATION_NOT_INITIALIZED"]


def test_a_broken_request_after_a_good_one_closes_the_connection(fast: Fast) -> None:
    """A frame that does not parse behind a good one sent at once: the connection
    closes (a broken peer); the helper serves on."""
    with fast.connect() as s:
        s.sendall(_frame(GENERATE_RANDOM, fast.id, 8) + struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        assert closed(s)
    with fast.connect() as s:
        assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0


@pytest.mark.parametrize("hint", [0, 1])
def test_a_frame_over_the_limit_closes_the_connection(fast: Fast, hint: int) -> None:
    with fast.connect() as s:  # 4 MiB at most: the client's inputs are 1 MiB at most
        s.sendall(bytes([hint]) + ((4 << 20) + 1).to_bytes(3, "big"))
        assert closed(s)


def _plane_thread(pid: int) -> tuple[int, int]:
    """The helper's one data-plane thread: its id, and how many times it changed CPU."""
    (tid,) = [t for t in os.listdir(f"/proc/{pid}/task")
              if open(f"/proc/{pid}/task/{t}/comm").read().strip() == "p11p-plane"]
    for line in open(f"/proc/{pid}/task/{tid}/sched"):
        if line.startswith("se.nr_migrations"):
            return int(tid), int(line.split(":")[1])
    raise AssertionError("no se.nr_migrations")


def test_a_connection_s_thread_follows_the_cpu_hint(fast: Fast) -> None:
    """The header's first byte is the client's CPU + 1: the thread serving the
    connection moves there to run the call (and may go anywhere later); a CPU it may not
    run on, or 0, is no hint. The ready frame says the helper reads hints. This test
    sits on one CPU and sends the hints of two: the thread changes CPU at least at each
    hint of the other (the scheduler would rather keep it by this one: it comes back)."""
    assert fast.helper.ready == [0, 0, fast.helper.pid, ["cpu_hint", "pairs", "mailbox"]]
    cpus = sorted(os.sched_getaffinity(fast.helper.pid))
    if len(cpus) < 2:
        pytest.skip("one CPU here: no hint can move a thread")
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        with fast.connect() as s:
            def random(hint: int) -> None:
                body = msgpack.packb([GENERATE_RANDOM, fast.id, 16], use_bin_type=True)
                s.sendall(bytes([hint]) + len(body).to_bytes(3, "big") + body)
                size = struct.unpack(">I", recv_exact(s, 4))[0]
                rv, data = msgpack.unpackb(recv_exact(s, size), raw=False)
                assert rv == 0 and len(data) == 16

            random(0)
            tid, before = _plane_thread(fast.helper.pid)
            for _ in range(10):
                random(cpus[1] + 1)  # the other CPU
                random(cpus[0] + 1)  # this one
            moved = _plane_thread(fast.helper.pid)[1] - before
            for hint in (0, 255):  # none, and a CPU it may not run on
                random(hint)
            assert moved >= 10, moved
            # it may still run anywhere it could
            assert sorted(os.sched_getaffinity(tid)) == cpus
    finally:
        os.sched_setaffinity(0, mine)


def test_calls_after_finalize_are_refused(spawn: Callable[..., HelperLink]) -> None:
    fast = Fast(spawn())
    with fast.connect() as s:
        assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0
        assert fast.helper.call(2) == [0]  # C_Finalize through the pipe
        try:
            reply = call(s, GENERATE_RANDOM, fast.id, 8)
        except (ConnectionError, OSError):
            reply = [CKR["CKR_CRYPTOKI_NOT_INITIALIZED"]]  # the process is already gone
        assert reply == [CKR["CKR_CRYPTOKI_NOT_INITIALIZED"]]


def test_at_most_64_connections_at_once(fast: Fast) -> None:
    """An application cannot flood its member past the helper's connection limit: the
    65th connection is closed (its client goes through the daemon and its limits)."""
    held = [fast.connect() for _ in range(64)]
    try:
        for s in held[:3]:
            assert call(s, GENERATE_RANDOM, fast.id, 8)[0] == 0
        try:
            with fast.connect() as extra:
                assert closed(extra)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before the token was even sent
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the helper sees the close a moment later
            try:
                with fast.connect() as again:
                    if call(again, GENERATE_RANDOM, fast.id, 8)[0] == 0:
                        break
            except (ConnectionError, OSError):
                pass  # refused: the helper has not seen the close yet
            assert time.monotonic() < deadline, "no connection served after one closed"
            time.sleep(0.05)
    finally:
        for s in held:
            s.close()


def test_outputs_are_bounded_as_on_the_pipe(spawn: Callable[..., HelperLink], hsm: Any) -> None:
    """The direct path's bound on one output is the helper's MAX_OUTPUT, from the frame
    limit of its environment, as on its pipe."""
    fast = Fast(spawn(env={**hsm.env, "P11P_MAX_FRAME": str(1 << 16)}))
    limit = (1 << 16) - (1 << 12)
    host_memory = CKR["CKR_HOST_MEMORY"]
    with fast.connect() as s:
        rv, data = call(s, GENERATE_RANDOM, fast.id, limit)
        assert rv == 0 and len(data) == limit
        assert call(s, GENERATE_RANDOM, fast.id, limit + 1) == [host_memory]
        assert fast.helper.call(GENERATE_RANDOM, fast.session, limit + 1) == [host_memory]
