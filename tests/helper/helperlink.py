"""Test side of the helper link: a SoftHSM2 token in a temporary directory and a helper
process spoken to with p11p's own framing over its pipes, stopped by its PID.

Replies are read by a thread and matched to calls by call id, so a test can have many
calls in flight at once (the helper may answer them in any order).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kit import SANITIZER_MARKS, sanitized_helper
from p11p.protocol.constants import CKA, CKF, CKU
from p11p.protocol.framing import FrameDecoder, encode

SOFTHSM_SO = "/usr/lib/softhsm/libsofthsm2.so"
# P11P_TEST_SANITIZED_HELPER=1 (test_helper_plane_sanitized.py runs the data plane's
# tests again so): every helper these tests start runs on the extension's ASan/UBSan twin
# (kit.sanitized_helper); a helper whose stderr has a sanitizer's report fails the test
# that stops it.
SANITIZED = os.environ.get("P11P_TEST_SANITIZED_HELPER") == "1"
USER_PIN = b"1234"
SO_PIN = b"5678"
TOKEN_LABEL = "tokA"
UNAVAILABLE = 2**64 - 1
TRUE, FALSE = b"\x01", b"\x00"


def ulong(v: int) -> bytes:
    """A CK_ULONG attribute value as the application lays it out (host order)."""
    return struct.pack("=Q", v)


def attr_ulong(data: bytes) -> int:
    return int(struct.unpack("=Q", data)[0])


class SoftHSMDir:
    """A SoftHSM2 configuration under one directory, with one initialized token."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tokens = root / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                             "log.level = ERROR\n")
        self.env = {**os.environ, "SOFTHSM2_CONF": str(self.conf),
                    **(sanitized_helper() if SANITIZED else {})}
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
                        "--pin", USER_PIN.decode(), "--so-pin", SO_PIN.decode()],
                       env=self.env, check=True, capture_output=True)


class HelperLink:
    """One helper process and the frames to and from it."""

    def __init__(self, module: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p11p.helper", module], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.pid = self.proc.pid
        self._decoder = FrameDecoder()
        self._replies: dict[int, list[Any]] = {}
        self._arrival: list[int] = []
        self._cond = threading.Condition()
        self._eof = False
        self._next_id = 1
        self._id_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        self.ready = self.reply(0, timeout=30)

    # -- plumbing ---------------------------------------------------------------------

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            data = os.read(fd, 1 << 16)
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                for frame in self._decoder.feed(data):
                    self._replies[frame[0]] = frame
                    self._arrival.append(frame[0])
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.decode(errors="replace").rstrip("\n"))

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        with self._write_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def new_id(self) -> int:
        with self._id_lock:
            call_id = self._next_id
            self._next_id += 1
            return call_id

    def send(self, code: int, *args: Any) -> int:
        """Sends one request; returns its call id."""
        call_id = self.new_id()
        self.write(encode([call_id, code, *args]))
        return call_id

    def reply(self, call_id: int, timeout: float = 20) -> list[Any]:
        """The whole reply frame `[call_id, rv, out...]` of one call."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while call_id not in self._replies:
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise TimeoutError(f"no reply to call {call_id} (eof={self._eof})")
                self._cond.wait(left)
            return self._replies.pop(call_id)

    def call(self, code: int, *args: Any) -> list[Any]:
        """[rv, out...] of one call."""
        return self.reply(self.send(code, *args))[1:]

    def ok(self, code: int, *args: Any) -> list[Any]:
        """The outputs of a call that must succeed."""
        rv, *outs = self.call(code, *args)
        assert rv == 0, f"code {code}: rv {rv:#x}"
        return outs

    @property
    def arrival_order(self) -> list[int]:
        with self._cond:
            return list(self._arrival)

    def wait_exit(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Closes stdin (the helper finalizes and exits); kills it by PID if it lingers."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.check_sanitizers()

    def check_sanitizers(self) -> None:
        """Fails when the helper's stderr carries a sanitizer's report (its reader has
        read all of it once the process is gone and its pipe closed)."""
        if self.proc.poll() is not None:
            self._stderr_reader.join(5)
        found = [line for line in self.stderr_lines if any(m in line for m in SANITIZER_MARKS)]
        assert not found, "\n".join(self.stderr_lines[-60:])

    # -- Cryptoki conveniences ----------------------------------------------------------

    def token_slot(self, label: str = TOKEN_LABEL) -> int:
        count = self.ok(5, 1, None)[0]
        for slot in self.ok(5, 1, count)[0]:
            info = self.ok(7, slot, 0)[0]
            if info[0].rstrip(b" ").decode() == label:
                return int(slot)
        raise LookupError(label)

    def open_session(self, slot: int, login: bool = True) -> int:
        flags = CKF["CKF_SERIAL_SESSION"] | CKF["CKF_RW_SESSION"]
        session = self.ok(13, slot, flags, 0)[0]
        if login:
            rv = self.call(19, session, CKU["CKU_USER"], USER_PIN)[0]
            assert rv in (0, 0x100), f"C_Login: {rv:#x}"  # or CKR_USER_ALREADY_LOGGED_IN
        return int(session)

    def get_attributes(self, session: int, obj: int, types: list[int]) -> dict[int, bytes]:
        """Values of attributes, by query then exact buffers."""
        lengths = self.ok(25, session, obj, [[t, None] for t in types])[0]
        values = self.ok(25, session, obj, [[t, n] for t, n in zip(types, lengths, strict=True)])[0]
        return dict(zip(types, values, strict=True))


def template(**attrs: bytes | list[Any]) -> list[list[Any]]:
    """[[CKA_x, value]] from CKA names without the prefix: template(TOKEN=FALSE)."""
    return [[CKA[f"CKA_{name}"], value] for name, value in attrs.items()]


def recv_exact(s: socket.socket, n: int) -> bytes:
    """n bytes from a socket (ConnectionError when it closes first)."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def closed(s: socket.socket) -> bool:
    """Whether the peer closed the connection."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
