"""The arena of the hostile-input tests: a SoftHSM2 token of its own, a p11p daemon over
it, a well-behaved application that must be served throughout, and the raw
connections that the hostile examples use.

Hostile examples share one application context (kept alive by an idle "anchor"
connection with the same context id), so that each example costs a connection, a
session and a few keys rather than a helper process. An example that ends the
context (C_Finalize) gets a new one.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from hostile_frames import Frame, Known
from hostile_wire import Closed, Hang, Wire, is_reply
from kit import CLIENT_SO, Daemon, SoftHSM, one_member_group
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKK, CKM, CKO, CKR

PIN = "hostile-pin-5821"
MAX_FRAME = 1 << 20
# Lines that must never appear in the daemon's log (helpers' stderr included): an
# exception that escaped to the event loop or to a catch-all, a helper that crashed or
# was killed, a member taken out of service by what one application sent.
FORBIDDEN = ("Traceback", "Unhandled exception", "Task exception was never retrieved",
             "xception in callback", "Fatal error", "internal error", "unencodable reply",
             "member failure detected", "group out of service", "helper killed",
             "helper exited", "Fatal Python error", "Segmentation fault")
OK = CKR["CKR_OK"]
ALREADY_LOGGED_IN = CKR["CKR_USER_ALREADY_LOGGED_IN"]
NOT_INITIALIZED = CKR["CKR_CRYPTOKI_NOT_INITIALIZED"]
KNOWN_RVS = frozenset(CKR.values())
FINALIZE = spec.by_name()["C_Finalize"].code
CLOSE_ALL = spec.by_name()["C_CloseAllSessions"].code
NOUTS = {f.code: len(f.outputs) for f in spec.functions()}
NOUTS[1001] = 1  # FIND_ALL
NOUTS.update({1002: 1, 1003: 1, 1004: 0, 1005: 1, 1006: 0, 1007: 0})  # the data plane's
NOUTS[1008] = 0  # OPEN_AT
EC_P256 = bytes.fromhex("06082a8648ce3d030107")


def le(v: int) -> bytes:
    return struct.pack("<Q", v)


GOOD_CLIENT = textwrap.dedent("""
    import sys, time
    import PyKCS11 as P
    lib = P.PyKCS11Lib(); lib.load(sys.argv[1])
    slot = lib.getSlotList(tokenPresent=True)[0]
    s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
    s.login(sys.argv[2])
    ec = bytes.fromhex("06082a8648ce3d030107")
    pub, priv = s.generateKeyPair(
        [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_TOKEN, False),
         (P.CKA_EC_PARAMS, ec), (P.CKA_VERIFY, True)],
        [(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_TOKEN, False),
         (P.CKA_SIGN, True), (P.CKA_PRIVATE, True)],
        mecha=P.Mechanism(P.CKM_EC_KEY_PAIR_GEN))
    print("ready", flush=True)
    for line in sys.stdin:
        t = time.monotonic()
        try:
            data = bytes(s.generateRandom(32))  # signed as a SHA-256 digest
            mech = P.Mechanism(P.CKM_ECDSA)
            sig = bytes(s.sign(priv, data, mech))
            good = s.verify(pub, data, sig, mech)
            bad = s.verify(pub, data[::-1], sig, mech)
            print("ok" if good and not bad else "wrong", round(time.monotonic() - t, 3), flush=True)
        except P.PyKCS11Error as exc:
            print("error", exc, flush=True)
    """)


class NoToken(Exception):
    """The context's helper found no token: its SoftHSM2 started while another process
    rewrote the token's files (a race in SoftHSM2's file store, seen without p11p too:
    a process that starts while another fails a login or writes a token object may
    find no token). That context is no use; a new one gets a new helper."""


class GoodClient:
    """An application on p11p-client.so that signs and verifies whenever asked."""

    def __init__(self, daemon: Daemon) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", GOOD_CLIENT, str(CLIENT_SO), PIN],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **daemon.env})
        self.checks = 0
        line = self._line(60)
        assert line == "ready", line

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the well-behaved client got no answer within {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the well-behaved client died: {err}")
        return line.strip()

    def check(self, timeout: float = 15.0) -> float:
        """One random + sign + verify round; returns its time in seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self._line(timeout)
        word, _, rest = line.partition(" ")
        assert word == "ok", f"the well-behaved client failed: {line}"
        self.checks += 1
        return float(rest)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Arena:
    """The daemon, the well-behaved client and the hostile examples' context."""

    def __init__(self, root: Path) -> None:
        self.hsm = SoftHSM(root / "softhsm")
        self.hsm.init_token("hostile", pin=PIN)
        group = one_member_group("hostile", self.hsm, "hostile",
                                 "call_timeout = 15\nobject_cache_ttl = 2")
        self.daemon = Daemon(root / "p11p", {"hostile": group}, daemon_extra=(
            f"max_frame = {MAX_FRAME}\ncontext_grace = 0\nmax_apps_per_uid = 1000\n"))
        self.daemon.start(log_level="info")
        self.good = GoodClient(self.daemon)
        self.ctx = os.urandom(16)
        self.anchor: Wire | None = None
        self.examples = 0
        self.replies = 0
        self.closes = 0
        self.rvs: dict[int, int] = {}
        self.check_every = 10
        self.finalized = False
        self.no_token = 0
        self._reanchor()

    # -- life -------------------------------------------------------------------------

    def stop(self) -> None:
        if self.anchor is not None:
            self.anchor.close()
        self.good.stop()
        self.daemon.stop()

    def _reanchor(self) -> None:
        old = self.anchor
        self.anchor = Wire(self.daemon.socket)
        self.anchor.hello(self.ctx)
        if old is not None:
            old.close()

    def connect(self, ctx: bytes | None = None) -> Wire:
        w = Wire(self.daemon.socket)
        w.hello(self.ctx if ctx is None else ctx)
        return w

    # -- checks -----------------------------------------------------------------------

    def assert_alive(self) -> None:
        proc = self.daemon.proc
        assert proc is not None and proc.poll() is None, (
            f"the daemon died ({proc.returncode if proc else '?'}):\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.daemon.log_text().splitlines()[-n:])

    def assert_clean_log(self) -> None:
        bad = [line for line in self.daemon.log_text().splitlines()
               if any(mark in line for mark in FORBIDDEN)]
        assert not bad, "the daemon's log shows an escaped exception or a failure:\n" + \
            "\n".join(bad[:20])
        assert PIN not in self.daemon.log_text()

    def assert_serving(self) -> None:
        """The daemon lives, its log is clean and the well-behaved client is served."""
        self.assert_alive()
        self.good.check()
        self.assert_clean_log()

    # -- one hostile example ----------------------------------------------------------

    def prepare(self, w: Wire) -> Known:
        """A session of the example on `w`, logged in, with a few keys of every kind."""
        known = Known()
        reply = w.call([13, 0, 6, 0])  # C_OpenSession slot 0, RW | SERIAL
        if reply[0] == CKR["CKR_SLOT_ID_INVALID"]:
            raise NoToken()
        assert reply[0] == OK, reply
        h = reply[1]
        known.sessions.append(h)
        rv = w.call([19, h, 1, PIN.encode()])[0]  # C_Login CKU_USER
        if rv == CKR["CKR_USER_PIN_NOT_INITIALIZED"]:
            raise NoToken()
        assert rv in (OK, ALREADY_LOGGED_IN), rv
        true, false = b"\x01", b"\x00"
        aes = w.call([59, h, [CKM["CKM_AES_KEY_GEN"], None], [
            [CKA["CKA_CLASS"], le(CKO["CKO_SECRET_KEY"])], [CKA["CKA_KEY_TYPE"], le(CKK["CKK_AES"])],
            [CKA["CKA_VALUE_LEN"], le(16)], [CKA["CKA_TOKEN"], false],
            *[[CKA[n], true] for n in ("CKA_ENCRYPT", "CKA_DECRYPT", "CKA_SIGN", "CKA_VERIFY",
                                        "CKA_WRAP", "CKA_UNWRAP", "CKA_DERIVE", "CKA_EXTRACTABLE")]],
            0])
        assert aes[0] == OK, aes
        ec = w.call([60, h, [CKM["CKM_EC_KEY_PAIR_GEN"], None],
                     [[CKA["CKA_EC_PARAMS"], EC_P256], [CKA["CKA_VERIFY"], true],
                      [CKA["CKA_TOKEN"], false]],
                     [[CKA["CKA_SIGN"], true], [CKA["CKA_DERIVE"], true],
                      [CKA["CKA_TOKEN"], false]], 0, 0])
        assert ec[0] == OK, ec
        data = w.call([21, h, [[CKA["CKA_CLASS"], le(CKO["CKO_DATA"])],
                               [CKA["CKA_LABEL"], b"hostile"], [CKA["CKA_VALUE"], b"v" * 20],
                               [CKA["CKA_TOKEN"], false]], 0])
        assert data[0] == OK, data
        known.objects += [aes[1], ec[1], ec[2], data[1]]
        known.keys.update(aes=aes[1], ec_pub=ec[1], ec_priv=ec[2], data=data[1])
        rsa = self._rsa(w, h)
        known.objects += rsa
        known.keys.update(rsa_pub=rsa[0], rsa_priv=rsa[1])
        return known

    def _rsa(self, w: Wire, h: int) -> list[int]:
        """The token's RSA key pair (made once; again if an example destroyed it)."""
        label = [CKA["CKA_LABEL"], b"hostile-rsa"]
        pair: list[Any] = []
        for cls in ("CKO_PUBLIC_KEY", "CKO_PRIVATE_KEY"):
            found = w.call([1001, h, [label, [CKA["CKA_CLASS"], le(CKO[cls])]]])
            assert found[0] == OK, found
            pair.append(found[1][0] if found[1] else None)
        if None not in pair:
            return pair
        true = b"\x01"
        made = w.call([60, h, [CKM["CKM_RSA_PKCS_KEY_PAIR_GEN"], None],
                       [label, [CKA["CKA_TOKEN"], true], [CKA["CKA_MODULUS_BITS"], le(1024)],
                        [CKA["CKA_PUBLIC_EXPONENT"], b"\x01\x00\x01"],
                        *[[CKA[n], true] for n in ("CKA_ENCRYPT", "CKA_VERIFY", "CKA_WRAP")]],
                       [label, [CKA["CKA_TOKEN"], true], [CKA["CKA_PRIVATE"], true],
                        *[[CKA[n], true] for n in ("CKA_DECRYPT", "CKA_SIGN", "CKA_UNWRAP")]],
                       0, 0])
        assert made[0] == OK, made
        return [made[1], made[2]]

    def run(self, w: Wire, frames: list[Frame]) -> None:
        """Sends the frames one after the other and checks each answer."""
        for frame in frames:
            if not self._send(w, frame):
                return
            if frame.expect == "reply":
                try:
                    reply = w.recv()
                except Closed:
                    raise AssertionError(f"connection closed after a request: {frame.request!r:.300}") from None
                except Hang as exc:
                    raise AssertionError(f"{exc}: request {frame.request!r:.300}") from None
                self.check_reply(frame.request, reply)
                continue
            if frame.expect == "close":
                assert w.wait_closed(10), f"connection not closed after {frame.data[:60]!r}"
                self.closes += 1
            return  # what follows on this connection would mean nothing

    def note_finalize(self, request: Any) -> None:
        if type(request) is list and request and request[0] == FINALIZE:
            self.finalized = True  # the context may end: the next example needs a new one

    def _send(self, w: Wire, frame: Frame) -> bool:
        self.note_finalize(frame.request)
        if frame.chunks <= 1:
            return w.send_raw(frame.data)
        step = max(1, len(frame.data) // frame.chunks)
        for i in range(0, len(frame.data), step):
            if not w.send_raw(frame.data[i:i + step]):
                return False
            time.sleep(0.001)
        return True

    def check_reply(self, request: Any, reply: Any) -> None:
        """A reply as the protocol has it: [rv] or [rv, one per output], rv a CK_RV."""
        assert is_reply(reply), f"not a reply: {reply!r:.200} to {request!r:.300}"
        rv = reply[0]
        assert rv in KNOWN_RVS, f"rv {rv:#x} to {request!r:.300}"
        code = request[0]
        nouts = NOUTS.get(code, 0) if type(code) is int else 0
        assert len(reply) in (1, 1 + nouts), f"reply {reply!r:.200} to {request!r:.300}"
        self.replies += 1
        self.rvs[rv] = self.rvs.get(rv, 0) + 1

    def example(self, frames_of: Any, run: Any = None) -> None:
        """One hostile example: connect, prepare, send what `frames_of(known)` gives
        (with `run`, or `self.run`), close; then the daemon must live (and, now and
        then, serve the good client)."""
        self.finalized = False
        for _ in range(3):
            with self.connect() as w:
                try:
                    known = self.prepare(w)
                except NoToken:
                    self.no_token += 1
                    self.ctx = os.urandom(16)  # a new context, with a new helper
                    self._reanchor()
                    continue
                (run or self.run)(w, frames_of(known))
                break
        else:
            raise AssertionError("three helpers in a row found no token")
        if self.finalized:
            self._reanchor()  # holds the context that is current now
        assert self.anchor is not None
        # the example's sessions and keys end with it (and the context's login)
        assert self.anchor.call([CLOSE_ALL, 0])[0] == OK
        self.examples += 1
        self.assert_alive()
        if self.examples % self.check_every == 0:
            self.assert_serving()
