"""Atheris fuzzer of the daemon's dispatch against a real SoftHSM2 token: the daemon
(p11p.daemon.service.Daemon with its router, virtual view and helpers) runs in this
process on an event loop of its own thread, so that the fuzzer sees the coverage of the
daemon's Python code; every input is decoded as a client's request frame body and
dispatched in one application context, as a connection would.

An input is the msgpack body of one request, or of an array of up to 8 requests (so
that one input can start an operation and go on with it). Small integers (1..16) in
session and object positions stand for the context's live handles (its session, an
AES key, an EC key pair, a data object), so mutations keep hitting real state.

What must hold for every input: dispatch returns (within 30 s, C_WaitForSlotEvent
without CKF_DONT_BLOCK excepted) a reply [rv] or [rv, one per output] that encodes;
nothing is logged with an exception, no member is failed, no helper crashes or logs an
internal error, and no exception reaches the event loop.

    python3 fuzz/fuzz_dispatch.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["p11p.daemon", "p11p.protocol"]):
    from p11p.daemon.config import load
    from p11p.daemon.context import ApplicationContext
    from p11p.daemon.service import Daemon
    from p11p.protocol import spec
    from p11p.protocol.constants import CKA, CKK, CKM, CKO, CKR
    from p11p.protocol.framing import ProtocolError, decode_body, encode

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
PIN = b"fuzz-pin-3370"
SO_PIN = b"fuzz-so-8812"
CALL_TIMEOUT = 30.0
FIND_ALL = 1001
WAIT_FOR_SLOT_EVENT = spec.by_name()["C_WaitForSlotEvent"].code
HANDLE_KINDS = {"session", "object"}
POSITIONS = {f.code: [i for i, a in enumerate(f.wire_args, 1) if a.kind in HANDLE_KINDS]
             for f in spec.functions()}
POSITIONS[FIND_ALL] = [1]
NOUTS = {f.code: len(f.outputs) for f in spec.functions()}
NOUTS[FIND_ALL] = 1
# ERROR lines that only tell of the calling application's own session (the HA code's
# verdict on a session it could not rebuild), not of the daemon or of other applications.
OWN_SESSION_ONLY = ("session potentially not recoverable",)
HELPER_BAD = ("internal error", "Traceback", "Fatal", "Segmentation")


class Escaped(Exception):
    """Something that must never happen did (the message says what)."""


class NoToken(Exception):
    """The context's helper found no token: its SoftHSM2 started while another process
    rewrote the token's files (a race of SoftHSM2's file store, seen without p11p too);
    the context is useless, a new one gets a new helper."""


def le(v: int) -> bytes:
    return struct.pack("<Q", v)


class Watch(logging.Handler):
    """Notes log records that tell of an escaped exception or a failed member."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info or (record.levelno >= logging.ERROR
                               and not any(m in text for m in OWN_SESSION_ONLY)):
            self.bad.append(f"{record.name} {record.levelname}: {text}")


class Arena:
    """The token, the daemon on its loop thread, and one application context."""

    def __init__(self) -> None:
        work = os.environ.get("P11P_FUZZ_WORKDIR")  # run.py: build/fuzz/work-dispatch
        if work:
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
        self.root = Path(work or tempfile.mkdtemp(prefix="p11p-fuzz-dispatch-"))
        conf = self.root / "softhsm2.conf"
        (self.root / "tokens").mkdir()
        conf.write_text(f"directories.tokendir = {self.root / 'tokens'}\n"
                        "objectstore.backend = file\nlog.level = ERROR\n")
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "fuzz",
                        "--pin", PIN.decode(), "--so-pin", SO_PIN.decode()],
                       env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True,
                       capture_output=True)
        (self.root / "tokens.d").mkdir()
        (self.root / "tokens.d" / "fuzz.toml").write_text(textwrap.dedent(f"""
            label = "fuzz"
            call_timeout = 20
            [[member]]
            name = "softhsm"
            module = "{SOFTHSM}"
            token = "fuzz"
            env = {{ SOFTHSM2_CONF = "{conf}" }}
            """))
        (self.root / "p11p.toml").write_text(
            '[daemon]\nsocket = "run/p11p.sock"\ntokens_dir = "tokens.d"\n'
            "context_grace = 0\nmax_frame = 1048576\n")
        self.helper_log = open(self.root / "helpers.log", "ab")  # noqa: SIM115
        self.helper_log_seen = 0
        self.watch = Watch()
        for name in ("p11p", "asyncio"):
            logging.getLogger(name).addHandler(self.watch)
        logging.getLogger("p11p").setLevel(logging.INFO)
        self.loop_errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(
            lambda loop, c: self.loop_errors.append(f"{c.get('message')} {c.get('exception')!r}"))
        self._route_helper_stderr()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        config = load(self.root / "p11p.toml")

        async def start() -> Daemon:
            daemon = Daemon(config)
            await daemon.start()
            return daemon
        self.daemon: Daemon = self.run(start())
        self.ctx: ApplicationContext | None = None
        self.no_token = 0
        self.known: list[int] = []
        self.new_context()

    def _route_helper_stderr(self) -> None:
        """Helpers write their log to a file of ours (they inherit stderr otherwise)."""
        exec_ = self.loop.subprocess_exec
        log_fd = self.helper_log.fileno()

        async def subprocess_exec(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("stderr") is None:
                kwargs["stderr"] = log_fd
            return await exec_(*args, **kwargs)
        self.loop.subprocess_exec = subprocess_exec  # type: ignore[method-assign]

    def run(self, coro: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _attach(self) -> ApplicationContext:
        return self.daemon.attach(os.getpid(), os.getuid(), os.getgid(), os.urandom(16), "fuzz")

    def new_context(self) -> None:
        for _ in range(5):
            self.ctx = self.run(self._attach())
            try:
                self.prepare()
                return
            except NoToken:
                self.no_token += 1
                print(f"fuzz_dispatch: a helper found no token (SoftHSM2's file store race; "
                      f"{self.no_token} so far); a new context", file=sys.stderr)
                self.call([2])  # C_Finalize: ends it, helper and all
        raise Escaped("five helpers in a row found no token")

    def call(self, request: list[Any]) -> list[Any]:
        assert self.ctx is not None
        reply: list[Any] = self.run(self.daemon.dispatcher.dispatch(self.ctx, request))
        return reply

    def prepare(self) -> None:
        """A session, logged in, with an AES key, an EC key pair and a data object."""
        true, false = b"\x01", b"\x00"
        opened = self.call([13, 0, 6, 0])
        if opened[0] == CKR["CKR_SLOT_ID_INVALID"]:
            raise NoToken()
        assert opened[0] == 0, f"C_OpenSession: {opened}"
        h = opened[1]
        rv = self.call([19, h, 1, PIN])[0]
        if rv == CKR["CKR_USER_PIN_NOT_INITIALIZED"]:
            raise NoToken()
        if rv == CKR["CKR_PIN_INCORRECT"]:
            # an input changed the user PIN (C_SetPIN with the right old one): set it back
            assert self.call([19, h, 0, SO_PIN])[0] == 0  # CKU_SO
            assert self.call([11, h, PIN])[0] == 0  # C_InitPIN
            assert self.call([20, h])[0] == 0
            rv = self.call([19, h, 1, PIN])[0]
        assert rv in (0, CKR["CKR_USER_ALREADY_LOGGED_IN"]), f"login: {rv:#x}"
        aes = self.call([59, h, [CKM["CKM_AES_KEY_GEN"], None], [
            [CKA["CKA_CLASS"], le(CKO["CKO_SECRET_KEY"])], [CKA["CKA_KEY_TYPE"], le(CKK["CKK_AES"])],
            [CKA["CKA_VALUE_LEN"], le(16)], [CKA["CKA_TOKEN"], false],
            *[[CKA[n], true] for n in ("CKA_ENCRYPT", "CKA_DECRYPT", "CKA_SIGN", "CKA_VERIFY",
                                        "CKA_WRAP", "CKA_UNWRAP", "CKA_DERIVE", "CKA_EXTRACTABLE")]],
            0])[1]
        ec = self.call([60, h, [CKM["CKM_EC_KEY_PAIR_GEN"], None],
                        [[CKA["CKA_EC_PARAMS"], bytes.fromhex("06082a8648ce3d030107")],
                         [CKA["CKA_VERIFY"], true], [CKA["CKA_TOKEN"], false]],
                        [[CKA["CKA_SIGN"], true], [CKA["CKA_DERIVE"], true],
                         [CKA["CKA_TOKEN"], false]], 0, 0])
        data = self.call([21, h, [[CKA["CKA_CLASS"], le(CKO["CKO_DATA"])],
                                  [CKA["CKA_VALUE"], b"v" * 20], [CKA["CKA_TOKEN"], false]], 0])[1]
        self.known = [h, aes, ec[1], ec[2], data]

    # -- checks -----------------------------------------------------------------------

    def check_logs(self) -> None:
        if self.watch.bad:
            raise Escaped("logged: " + self.watch.bad[0])
        if self.loop_errors:
            raise Escaped("exception on the event loop: " + self.loop_errors[0])
        self.helper_log.flush()
        size = os.fstat(self.helper_log.fileno()).st_size
        if size > self.helper_log_seen:
            with open(self.root / "helpers.log", "rb") as f:
                f.seek(self.helper_log_seen)
                text = f.read().decode(errors="replace")
            self.helper_log_seen = size
            bad = [line for line in text.splitlines() if any(m in line for m in HELPER_BAD)]
            if bad:
                raise Escaped("helper: " + bad[0])

    def settle(self) -> None:
        """After an input: a context and a session to go on with."""
        assert self.ctx is not None
        if self.ctx.closed:
            self.new_context()
        elif self.ctx.sessions.find(self.known[0]) is None or len(self.ctx.sessions) > 64:
            self.call([15, 0])  # C_CloseAllSessions
            try:
                self.prepare()
            except NoToken:
                self.call([2])
                self.new_context()
        elif not self.ctx.logins:  # an input logged the application out
            self.call([19, self.known[0], 1, PIN])


def _map_handles(arena: Arena, req: list[Any]) -> list[Any]:
    code = req[0]
    if type(code) is not int:
        return req
    for i in POSITIONS.get(code, ()):
        if i < len(req) and type(req[i]) is int and 1 <= req[i] <= 16:
            req[i] = arena.known[(req[i] - 1) % len(arena.known)]
    return req


def _blocks(req: list[Any]) -> bool:
    return (req[0] == WAIT_FOR_SLOT_EVENT and len(req) > 1 and isinstance(req[1], int)
            and not req[1] & 1)


def _one(arena: Arena, req: Any) -> None:
    if type(req) is not list or not req:
        return  # the connection would be closed: nothing is dispatched
    req = _map_handles(arena, req)
    if _blocks(req):
        return  # waits for a slot event by design
    try:
        reply = arena.call(req)
    except TimeoutError:
        raise Escaped(f"no reply within {CALL_TIMEOUT:g} s to {req!r:.200}") from None
    if type(reply) is not list or not reply or type(reply[0]) is not int:
        raise Escaped(f"reply {reply!r:.200} to {req!r:.200}")
    code = req[0]
    nouts = NOUTS.get(code, 0) if type(code) is int else 0
    if len(reply) not in (1, 1 + nouts):
        raise Escaped(f"reply {reply!r:.200} has {len(reply) - 1} outputs, not {nouts}")
    encode(reply)  # the connection would send it


ARENA: Arena | None = None


def test_one(data: bytes) -> None:
    assert ARENA is not None
    try:
        body = decode_body(data)
    except ProtocolError:
        return
    batch = body[:8] if type(body) is list and body and type(body[0]) is list else [body]
    try:
        for req in batch:
            _one(ARENA, req)
        ARENA.settle()
    finally:
        ARENA.check_logs()


def main() -> None:
    global ARENA
    ARENA = Arena()
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
