"""A data-plane connection's mailbox (protocol/p11p-box.h, helper/fast_conn.c), driven
from Python as the client library drives it (client/box.c): asked for with a
zero-length frame, received as a sealed memfd, then requests and replies in shared
memory with the futex word saying whose turn it is. Each answer is checked against the
module's (an ECDSA signature verifies, a digest is hashlib's) and against the same call
on the socket; too large a request or reply takes the socket; an idle mailbox goes back
to the socket and a nudge brings it back; a bad mailbox request closes its connection,
and the helper serves on; a helper passing to another application closes the mailboxes
of the one before; a helper that cannot make one answers without it."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import mmap
import os
import resource
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from helperfixtures import *  # noqa: F403  (the fixtures)
from helperlink import FALSE, SOFTHSM_SO, TRUE, HelperLink, SoftHSMDir, closed, recv_exact, template
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKM, CKR

FAST_START, FAST_ALLOW, PING = -2, -3, -1
CODE = {f.name: f.code for f in spec.functions()}
OK = CKR["CKR_OK"]
P256 = bytes.fromhex("06082a8648ce3d030107")

# protocol/p11p-box.h
SIZE = 128 << 10
HEAD = 64
AREA = (SIZE - HEAD) // 2
ON_SOCKET = 0xFFFFFFFF
SOCKET, READY, REQUEST, REPLY, CLOSED = range(5)
IDLE_S = 0.2  # helper/fast_conn.c BOX_IDLE_NS

_libc = ctypes.CDLL(None, use_errno=True)
SYS_FUTEX, FUTEX_WAKE = 202, 1


class Box:
    """One connection with its mailbox, spoken to as client/box.c does (its waits polled)."""

    def __init__(self, name: bytes, token: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(b"\0" + name)
        self.sock.sendall(token)
        self.sock.sendall(b"\0\0\0\0")
        head, fds, _flags, _addr = socket.recv_fds(self.sock, 4, 1)
        assert head == b"\0\0\0\0" and len(fds) == 1
        self.fd = fds[0]
        self.map = mmap.mmap(self.fd, SIZE)
        self.word_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def close(self) -> None:
        self.sock.close()
        os.close(self.fd)

    @property
    def word(self) -> int:
        value: int = struct.unpack_from("<I", self.map, 0)[0]
        return value

    @word.setter
    def word(self, value: int) -> None:
        struct.pack_into("<I", self.map, 0, value)

    def wake(self) -> None:
        assert _libc.syscall(SYS_FUTEX, ctypes.c_void_p(self.word_addr), FUTEX_WAKE, 1,
                             None, None, 0) >= 0

    def post(self, frames: bytes, length: int | None = None) -> None:
        """The request bytes into the mailbox, and the helper told (as client/box.c)."""
        self.map[HEAD:HEAD + len(frames)] = frames
        struct.pack_into("<I", self.map, 4, len(frames) if length is None else length)
        word = self.word
        if word == READY:
            self.word = REQUEST
            self.wake()
        else:
            assert word == SOCKET, word
            self.word = REQUEST
            self.sock.sendall(b"\0\0\0\0")  # the nudge

    def wait(self, timeout: float = 10) -> int:
        until = time.monotonic() + timeout
        while self.word == REQUEST and time.monotonic() < until:
            time.sleep(0.0002)
        return self.word

    def replies(self, count: int) -> list[list[Any]]:
        assert self.wait() == REPLY
        (length,) = struct.unpack_from("<I", self.map, 8)
        bodies = []
        if length == ON_SOCKET:
            for _ in range(count):
                size = struct.unpack(">I", recv_exact(self.sock, 4))[0]
                bodies.append(recv_exact(self.sock, size))
        else:
            data, pos = bytes(self.map[HEAD + AREA:HEAD + AREA + length]), 0
            for _ in range(count):
                size = struct.unpack_from(">I", data, pos)[0]
                bodies.append(data[pos + 4:pos + 4 + size])
                pos += 4 + size
            assert pos == length
        self.word = READY
        return [msgpack.unpackb(b, raw=False) for b in bodies]

    def call(self, *requests: list[Any]) -> list[list[Any]]:
        self.post(b"".join(frame(r) for r in requests))
        return self.replies(len(requests))


def frame(request: list[Any], hint: int = 0) -> bytes:
    body = msgpack.packb(request, use_bin_type=True)
    return bytes([hint]) + len(body).to_bytes(3, "big") + body


class Plane:
    """A helper with its data plane listening and one bound session (id), logged in, with
    an EC key pair."""

    def __init__(self, helper: HelperLink) -> None:
        self.helper = helper
        self.name = b"p11p-mailbox-" + secrets.token_hex(6).encode()
        self.token = secrets.token_bytes(16)
        assert helper.call(FAST_START, self.name, self.token, os.getuid()) == [OK]
        self.session = helper.open_session(helper.token_slot())
        (self.id,) = helper.ok(FAST_ALLOW, self.session)
        pub, priv = helper.ok(CODE["C_GenerateKeyPair"], self.session,
                              [CKM["CKM_EC_KEY_PAIR_GEN"], None],
                              template(TOKEN=FALSE, EC_PARAMS=P256, VERIFY=TRUE),
                              template(TOKEN=FALSE, PRIVATE=TRUE, SIGN=TRUE), 0, 0)
        self.ec_priv = int(priv)
        point = helper.get_attributes(self.session, pub, [CKA["CKA_EC_POINT"]])[CKA["CKA_EC_POINT"]]
        self.ec_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])

    def box(self) -> Box:
        return Box(self.name, self.token)

    def req(self, name: str, *args: Any) -> list[Any]:
        return [CODE[name], self.id, *args]


@pytest.fixture(scope="module")
def plane(hsm: SoftHSMDir) -> Iterator[Plane]:
    link = HelperLink(SOFTHSM_SO, hsm.env)
    try:
        yield Plane(link)
    finally:
        link.stop()


def _verify(plane: Plane, digest: bytes, sig: bytes) -> None:
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    plane.ec_public.verify(utils.encode_dss_signature(r, s), digest,
                           ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_the_mailbox_is_sealed_and_carries_calls_and_pairs(plane: Plane) -> None:
    box = plane.box()
    try:
        seals = fcntl.fcntl(box.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        assert os.fstat(box.fd).st_size == SIZE
        with pytest.raises(PermissionError):
            os.ftruncate(box.fd, 4096)  # the client cannot shrink it under the helper
        assert box.word == SOCKET  # the thread reads the socket until a nudge
        data = os.urandom(1000)
        # the first request: stored REQUEST and nudged; the next ones: woken on the word
        assert box.call(plane.req("C_GenerateRandom", 0)) == [[OK, b""]]
        assert box.word == READY
        assert box.call(plane.req("C_DigestInit", [CKM["CKM_SHA256"], None]),
                        plane.req("C_Digest", data, 64)) == [[OK], [OK, hashlib.sha256(data).digest()]]
        for i in range(20):  # a pair: the init and the signature, both replies at once
            d = hashlib.sha256(b"%d" % i).digest()
            init, (rv, sig) = box.call(plane.req("C_SignInit", [CKM["CKM_ECDSA"], None], plane.ec_priv),
                                       plane.req("C_Sign", d, 64))
            assert init == [OK] and rv == OK
            _verify(plane, d, sig)
        # the CPU hint in a request's header is read there as on the socket
        box.post(frame(plane.req("C_GenerateRandom", 8), hint=1))
        [(rv, random)] = box.replies(1)
        assert rv == OK and len(random) == 8
    finally:
        box.close()


def test_an_idle_mailbox_goes_back_to_the_socket_and_a_nudge_brings_it_back(plane: Plane) -> None:
    box = plane.box()
    try:
        assert box.call(plane.req("C_GenerateRandom", 4))[0][0] == OK
        assert box.word == READY
        time.sleep(IDLE_S * 2.5)
        assert box.word == SOCKET  # its thread reads the socket again, and sleeps there
        assert box.call(plane.req("C_GenerateRandom", 4))[0][0] == OK  # nudged
        assert box.word == READY
    finally:
        box.close()


def test_too_large_a_request_or_reply_takes_the_socket(plane: Plane) -> None:
    box = plane.box()
    try:
        box.call(plane.req("C_GenerateRandom", 1))
        # a reply over the area: announced in the mailbox, sent on the socket
        [(rv, random)] = box.call(plane.req("C_GenerateRandom", AREA + 1000))
        assert rv == OK and len(random) == AREA + 1000
        # so are a pair's two when the second does not fit
        init, (rv, random) = box.call(plane.req("C_DigestInit", [CKM["CKM_SHA256"], None]),
                                      plane.req("C_GenerateRandom", AREA))
        assert init == [OK] and rv == OK and len(random) == AREA
        init_rv = box.call(plane.req("C_Digest", b"", 64))[0]
        assert init_rv == [OK, hashlib.sha256(b"").digest()]
        # a request over the area: the client sends the thread to the socket, then the
        # request there; its reply comes there
        assert box.word == READY
        box.word = SOCKET
        box.wake()
        data = os.urandom(AREA + 5000)
        for request in (plane.req("C_DigestInit", [CKM["CKM_SHA256"], None]),
                        plane.req("C_Digest", data, 64)):
            box.sock.sendall(frame(request))
            size = struct.unpack(">I", recv_exact(box.sock, 4))[0]
            reply = msgpack.unpackb(recv_exact(box.sock, size), raw=False)
        assert reply == [OK, hashlib.sha256(data).digest()]
        assert box.word == SOCKET
        assert box.call(plane.req("C_GenerateRandom", 4))[0][0] == OK  # nudged back
    finally:
        box.close()


@pytest.mark.parametrize("bad", ["empty", "over the area", "a frame past its end",
                                 "a nudge inside", "garbage"])
def test_a_bad_mailbox_request_closes_its_connection(plane: Plane, bad: str) -> None:
    box = plane.box()
    try:
        box.call(plane.req("C_GenerateRandom", 1))
        good = frame(plane.req("C_GenerateRandom", 1))
        if bad == "empty":
            box.post(good, length=0)
        elif bad == "over the area":
            box.post(good, length=AREA + 1)
        elif bad == "a frame past its end":
            box.post(good[:4] + good[4:-1], length=len(good) - 1)
        elif bad == "a nudge inside":
            box.post(good + b"\0\0\0\0")
        else:
            box.post(b"\0\0\0\x03\xc1\xc1\xc1")
        assert box.wait() == CLOSED
        assert closed(box.sock)
    finally:
        box.close()
    other = plane.box()  # the helper serves on
    try:
        assert other.call(plane.req("C_GenerateRandom", 2))[0][0] == OK
    finally:
        other.close()
    assert plane.helper.call(PING)[0] == OK


def test_a_helper_passing_to_another_application_closes_the_mailboxes(hsm: SoftHSMDir) -> None:
    link = HelperLink(SOFTHSM_SO, hsm.env)
    try:
        plane = Plane(link)
        idle, waiting = plane.box(), plane.box()
        assert idle.call(plane.req("C_GenerateRandom", 1))[0][0] == OK
        assert waiting.call(plane.req("C_GenerateRandom", 1))[0][0] == OK
        assert link.call(FAST_START, plane.name, secrets.token_bytes(16), os.getuid()) == [OK]
        for box in (idle, waiting):
            until = time.monotonic() + 5
            while box.word != CLOSED and time.monotonic() < until:
                time.sleep(0.001)
            assert box.word == CLOSED
            assert closed(box.sock)
            box.close()
    finally:
        link.stop()


def test_a_helper_that_cannot_make_a_mailbox_stays_on_the_socket(hsm: SoftHSMDir) -> None:
    """memfd_create failing in the helper (no file descriptor left: RLIMIT_NOFILE set to
    what it has open, once the connection is accepted): the zero-length frame comes back
    without a mailbox, and the connection serves on the socket."""
    link = HelperLink(SOFTHSM_SO, hsm.env)
    try:
        plane = Plane(link)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(b"\0" + plane.name)
        s.sendall(plane.token)
        assert call_on(s, plane.req("C_GenerateRandom", 1))[0] == OK  # accepted, served
        limits = resource.prlimit(link.pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{link.pid}/fd"))
        resource.prlimit(link.pid, resource.RLIMIT_NOFILE, (in_use, limits[1]))
        try:
            s.sendall(b"\0\0\0\0")
            head, fds, _flags, _addr = socket.recv_fds(s, 4, 1)
            assert head == b"\0\0\0\0" and fds == []
            [rv, random] = call_on(s, plane.req("C_GenerateRandom", 16))
            assert rv == OK and len(random) == 16
        finally:
            resource.prlimit(link.pid, resource.RLIMIT_NOFILE, limits)
        s.close()
    finally:
        link.stop()


def call_on(s: socket.socket, request: list[Any]) -> list[Any]:
    s.sendall(frame(request))
    size = struct.unpack(">I", recv_exact(s, 4))[0]
    reply: list[Any] = msgpack.unpackb(recv_exact(s, size), raw=False)
    return reply
