"""Both planes apply the same argument checks (DESIGN, invariant 5): a C_SignInit whose
mechanism has a structured parameter (protocol/mechanisms.spec) sent as raw bytes is
refused with CKR_MECHANISM_PARAM_INVALID by the daemon (shapes.unsafe_arguments) and by the
helper's direct path (fast.c), and the module never sees it: the member stays OK.

The requests are made by hand, as a hostile application would: through the daemon's
socket, and straight to the helper socket the daemon names for a bound session."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import msgpack
from hakit import HAGroup
from kit import USER_PIN
from p11p.daemon.direct import DIRECT_BIND, DIRECT_KEY
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKM, CKO, CKR

_HEADER = struct.Struct(">I")
FIND_ALL = 1001
OK = CKR["CKR_OK"]


class _Link:
    """A connection speaking the client link (or, after `token`, the direct path)."""

    def __init__(self, address: str, first: bytes = b"") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(address)
        if first:
            self.sock.sendall(first)

    def send(self, obj: Any) -> None:
        body = msgpack.packb(obj, use_bin_type=True)
        self.sock.sendall(_HEADER.pack(len(body)) + body)

    def recv(self) -> Any:
        def exactly(n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = self.sock.recv(n - len(data))
                assert chunk, "connection closed"
                data += chunk
            return data
        (size,) = _HEADER.unpack(exactly(_HEADER.size))
        return msgpack.unpackb(exactly(size), raw=False, strict_map_key=False)

    def call(self, request: list[Any]) -> list[Any]:
        self.send(request)
        reply: list[Any] = self.recv()
        return reply

    def close(self) -> None:
        self.sock.close()


def _le(v: int) -> bytes:
    return v.to_bytes(8, "little")


# CK_RSA_PKCS_PSS_PARAMS {CKM_SHA256, CKG_MGF1_SHA256, 32} as the module's own bytes:
# what a module would take for its structure if nobody refused it
PSS_AS_BYTES = struct.pack("=QQQ", CKM["CKM_SHA256"], 2, 32)


def test_a_structured_parameter_as_bytes_is_refused_on_both_planes(ha_factory: Any) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA"])
    daemon = _Link(str(group.daemon.socket))
    try:
        daemon.send({"p11p": 1, "ctx": os.urandom(16), "pid": os.getpid(), "prog": "checks"})
        assert daemon.recv() == {"p11p": 1}
        rv, slots = daemon.call([5, 1, 16])  # C_GetSlotList
        assert rv == OK and slots, slots
        rv, h = daemon.call([13, slots[0], 6, 0])  # C_OpenSession RW | SERIAL
        assert rv == OK
        assert daemon.call([19, h, 1, USER_PIN.encode()])[0] == OK  # C_Login CKU_USER
        rv, found = daemon.call([FIND_ALL, h, [[CKA["CKA_LABEL"], b"ha-rsa"],
                                               [CKA["CKA_CLASS"], _le(CKO["CKO_PRIVATE_KEY"])]]])
        assert rv == OK and len(found) == 1, (rv, found)
        key = found[0]
        pss = CKM["CKM_SHA256_RSA_PKCS_PSS"]

        # the daemon plane
        via_daemon = daemon.call([43, h, [pss, PSS_AS_BYTES], key])[0]

        # the direct plane: bind the session, then speak to its helper
        rv, bound = daemon.call([DIRECT_BIND, h])
        assert rv == OK, rv
        name, token, fast_id = bound[0], bound[1], bound[2]
        rv, member_key = daemon.call([DIRECT_KEY, h, key])
        assert rv == OK, rv
        helper = _Link("\0" + (name.decode() if isinstance(name, bytes) else name), token)
        try:
            via_direct = helper.call([43, fast_id, [pss, PSS_AS_BYTES], member_key])[0]
            # the binding still serves well-formed calls: nothing broke
            assert helper.call([43, fast_id, [pss, None], member_key])[0] != OK  # PSS needs its parameter
            assert helper.call([65, fast_id, 16])[0] == OK  # C_GenerateRandom
        finally:
            helper.close()
        assert via_daemon == CKR["CKR_MECHANISM_PARAM_INVALID"], hex(via_daemon)
        assert via_direct == via_daemon, (hex(via_direct), hex(via_daemon))
        # nor is it taken as an operation handed over from the data plane (the daemon
        # would replay it to a member after a failover)
        adopt = spec.own_codes()["DIRECT_ADOPT"].code
        rv = daemon.call([adopt, h, 43, [pss, PSS_AS_BYTES], key, 1])[0]
        assert rv == CKR["CKR_ARGUMENTS_BAD"], hex(rv)

        # and the structured form works on the daemon plane, so the key and member are fine
        rv = daemon.call([43, h, [pss, [CKM["CKM_SHA256"], 2, 32]], key])[0]
        assert rv == OK, hex(rv)
        rv, sig = daemon.call([44, h, b"data", 512])
        assert rv == OK and len(sig) == 256, hex(rv)
    finally:
        daemon.close()
    assert group.member("hsmA")["state"] == "OK"


def test_the_binding_tells_the_cpu_hint_only_to_a_client_that_agreed_it(ha_factory: Any) -> None:
    """DIRECT_BIND: six fields for a client without features, seven with `data_plane`,
    eight (the last: the helper follows CPU hints) with `cpu_hint` too, nine (the last:
    it answers a pair sent at once) with `plane_pairs` too; a request whose header carries
    a hint is served like one without."""
    group: HAGroup = ha_factory("failover", ["hsmA"])
    sizes = []
    for features in (None, ["data_plane"], ["data_plane", "cpu_hint"],
                     ["data_plane", "cpu_hint", "plane_pairs"]):
        daemon = _Link(str(group.daemon.socket))
        try:
            hello: dict[str, Any] = {"p11p": 1, "ctx": os.urandom(16), "pid": os.getpid(),
                                     "prog": "checks"}
            if features is not None:
                hello["features"] = features
            daemon.send(hello)
            assert daemon.recv().get("features", []) == (features or [])
            rv, slots = daemon.call([5, 1, 16])  # C_GetSlotList
            rv, h = daemon.call([13, slots[0], 6, 0])  # C_OpenSession RW | SERIAL
            assert rv == OK
            rv, bound = daemon.call([DIRECT_BIND, h])
            assert rv == OK, rv
            sizes.append(len(bound))
            name, token, fast_id = bound[0], bound[1], bound[2]
            helper = _Link("\0" + name.decode(), token)
            try:
                for hint in (0, 1, 2, 255):
                    body = msgpack.packb([65, fast_id, 16], use_bin_type=True)  # C_GenerateRandom
                    helper.sock.sendall(bytes([hint]) + len(body).to_bytes(3, "big") + body)
                    rv, data = helper.recv()
                    assert rv == OK and len(data) == 16
            finally:
                helper.close()
            assert bound[7:] == [True, True][:max(0, len(bound) - 7)]
        finally:
            daemon.close()
    assert sizes == [6, 7, 8, 9]
