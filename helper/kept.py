"""Secrets a helper keeps for the next daemon (helper/loop.py, ADOPTABLE, KEEP, KEPT):
the PIN of its application's login with its user type, and the application's state file
key, in memory locked out of swap and wiped when no longer needed."""

from __future__ import annotations

import ctypes
import threading

PIN_MAX = 256  # bytes a kept secret may have
_libc = ctypes.CDLL(None, use_errno=True)


class Kept:
    """A secret kept for the next daemon (a PIN with its user type, a state file's key),
    in memory locked out of swap, wiped when no longer needed and at the end."""

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(PIN_MAX)
        _libc.mlock(ctypes.addressof(self._buf), PIN_MAX)  # best effort (RLIMIT_MEMLOCK)
        self._len = -1
        self.user_type = 0
        self._lock = threading.Lock()

    def keep(self, user_type: int, pin: bytes) -> None:
        if len(pin) > PIN_MAX:
            return
        with self._lock:
            ctypes.memset(self._buf, 0, PIN_MAX)
            ctypes.memmove(self._buf, pin, len(pin))
            self._len, self.user_type = len(pin), user_type

    def get(self) -> tuple[int, bytes] | None:
        with self._lock:
            return None if self._len < 0 else (self.user_type, self._buf.raw[:self._len])

    def wipe(self) -> None:
        with self._lock:
            ctypes.memset(self._buf, 0, PIN_MAX)
            self._len = -1
