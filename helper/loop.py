"""The helper's I/O loop: frames in on stdin, module calls in worker threads, replies
out on stdout (protocol/README.md, "Helper link").

Workers take turns as the reader (leader/followers): the one that holds the reader's
lock reads and decodes the next request `[call_id, code, arg...]`, hands the lock to a
waiting worker (starting one when none waits, up to the thread limit) and then runs the
call itself, so a request goes from the pipe into the module without a hop to another
thread. The helper's own codes (PING, C_Initialize, unknown codes, requests of the wrong
shape) are answered the same way. Replies are written under a lock, one write per
frame, so they come back in any order. C_Finalize, EOF or a frame that breaks the
protocol ends the process: calls still running get a grace period, then the module is
finalized.

A helper that serves an application can outlive its daemon (protocol/README.md, "Daemon
restarts"): once told ADOPTABLE it listens on an abstract AF_UNIX name, and at its link's
EOF it keeps its module, sessions and data plane and waits there for a restarted daemon,
which proves itself with the token and the uid it was given and then speaks the same
frames over that socket. Replies to calls read from the old link go nowhere. Nobody in
time: it finalizes and exits as at EOF. For that daemon it keeps, in locked memory wiped
at the end, its application's state file key and the PIN of its last good C_Login (or
one the daemon gave it: KEEP), to read the file and to log in again on other members.
"""

from __future__ import annotations

import _thread
import ctypes
import hmac
import os
import queue
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from p11p.helper.calls import Plan
from p11p.helper.errors import (
    CKR_ARGUMENTS_BAD,
    CKR_CRYPTOKI_ALREADY_INITIALIZED,
    CKR_FUNCTION_FAILED,
    CKR_FUNCTION_NOT_SUPPORTED,
    CKR_OK,
    CKR_SESSION_COUNT,
    describe_rv,
    log,
    rv_for,
)
from p11p.helper.kept import PIN_MAX, Kept
from p11p.helper.settings import MAX_OUTPUT, PLANE_FEATURES
from p11p.protocol.framing import FrameDecoder, ProtocolError, encode
from p11p.protocol.spec import functions, own_codes

_OWN = own_codes()
PING = _OWN["PING"].code
# The data plane (fast.c; protocol/README.md, "Data plane"), driven by the daemon:
# [FAST_START, name, token, uid] -> [rv]; [FAST_ALLOW, session] -> [rv, id];
# [FAST_REVOKE, id] -> [rv]; [FAST_SERVED] -> [rv, calls served so far];
# [FAST_STUCK] -> [rv, ms the oldest direct call has been inside the module, 0: none]
FAST_START = _OWN["FAST_START"].code
FAST_ALLOW = _OWN["FAST_ALLOW"].code
FAST_REVOKE = _OWN["FAST_REVOKE"].code
FAST_SERVED = _OWN["FAST_SERVED"].code
FAST_STUCK = _OWN["FAST_STUCK"].code
# [ADOPTABLE, name, token, uid, ms, application pid, key] -> [rv]: outlive the daemon
# (above), keeping `key` (the application's state file's); [ADOPTABLE]: no more
# [KEPT] -> [rv, key, user type, PIN], [rv, key] or [rv]: the key, the last good C_Login
# [KEEP, user type, PIN] -> [rv]: keep this login for the next daemon (the daemon's own,
# for an application whose helpers that logged in are gone)
ADOPTABLE = _OWN["ADOPTABLE"].code
KEPT = _OWN["KEPT"].code
KEEP = _OWN["KEEP"].code
# [RECYCLE, slot, name, token, uid] -> [rv, state]: the helper's application ended and it
# serves the next one (daemon/pool.py): no longer ADOPTABLE, what it kept wiped, its data
# plane listening anew for nobody (`name` empty: it has none), every session of the slot
# closed; then a new session's state (C_GetSessionInfo), that session closed again. One
# request for what would be six; the first that fails ends it, with its rv.
RECYCLE = _OWN["RECYCLE"].code
C_INITIALIZE = 1
C_FINALIZE = 2
_CODES = {f.name: f.code for f in functions()}
CKF_SERIAL_SESSION = 4
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKU_CONTEXT_SPECIFIC = 2  # a login for one operation: not the token's
_PR_SET_PDEATHSIG = 1
_UNSET_WAIT = 5.0  # seconds ADOPTABLE waits for the main thread to clear it
_libc = ctypes.CDLL(None, use_errno=True)


CALL_ID_MAX = (1 << 64) - 1
READ_SIZE = 1 << 18


class Server:
    """Serves one module's calls over a pair of file descriptors."""

    def __init__(self, lib: Any, plans: dict[int, Plan], in_fd: int, out_fd: int,
                 threads: int, max_request: int, finalize_grace: float) -> None:
        self._lib = lib
        self._plans = plans
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._grace = finalize_grace
        self._pid = os.getpid()
        self._write_lock = threading.Lock()
        self._out_broken = False
        # the reader's turn: its holder reads, decodes and takes the next request
        self._reader = threading.Lock()
        self._decoder = FrameDecoder(max_request)
        self._frames: deque[Any] = deque()
        # workers: started, waiting for the reader's turn; the thread limit
        self._workers = threading.Lock()
        self._started = 0
        self._waiting = 0
        self._max_threads = threads
        self._status: int | None = None
        self._done = threading.Event()
        self._main: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        # calls taken and not yet answered (blocking ones apart): C_Finalize waits
        self._busy = 0
        self._idle = threading.Condition()
        self._ending = threading.Lock()
        # the daemon link's generation: bumped when a restarted daemon takes this helper
        self._link = 0
        # ADOPTABLE: (listening socket, token, the daemon's uid, seconds to wait, the
        # application's pid)
        self._adopt: tuple[socket.socket, bytes, int, float, int] | None = None
        self.kept = Kept()  # the PIN of the application's login
        self.kept_key = Kept()  # its state file's key (daemon/resume.py)

    # -- output -----------------------------------------------------------------------

    def send(self, reply: list[Any], link: int | None = None) -> None:
        """Writes one frame; the whole frame, under the lock, so frames never mix. A
        reply to a call read from an earlier daemon's link (`link`) goes nowhere."""
        frame = encode(reply)
        with self._write_lock:
            if self._out_broken or (link is not None and link != self._link):
                return
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(self._out_fd, view):]
            except OSError as exc:
                self._out_broken = True
                log.error("cannot write replies (%s); the daemon is gone", exc)

    # -- input ------------------------------------------------------------------------

    def serve(self) -> int:
        """Runs until C_Finalize, EOF or a protocol error; returns the exit status. The
        main thread runs what must run in it (PR_SET_PDEATHSIG is the thread's)."""
        self._start_worker()
        while (task := self._main.get()) is not None:
            task()
        assert self._status is not None
        return self._status

    def _start_worker(self) -> None:
        with self._workers:
            self._started += 1
        # a bare thread, not a threading.Thread: that one's Python (its events, the
        # module's registries) writes some 40 kB of pages a forked helper shares
        _thread.start_new_thread(self._worker, ())

    def _stop(self, status: int) -> None:
        if self._status is None:
            self._status = status
        self._done.set()
        self._main.put(None)

    def _worker(self) -> None:
        while not self._done.is_set():
            with self._workers:
                self._waiting += 1
            with self._reader:
                with self._workers:
                    self._waiting -= 1
                    spawn = self._waiting == 0 and self._started < self._max_threads
                if self._done.is_set():
                    return
                frame, status = self._next_frame()
                link = self._link
                if status is None:
                    with self._idle:
                        self._busy += 1
            if status is not None:
                self._stop(status)
                return
            # someone must read while this worker runs its call
            if spawn:
                self._start_worker()
            status = self.dispatch(frame, link)
            if status is not None:
                self._stop(status)
                return

    def _next_frame(self) -> tuple[Any, int | None]:
        """The next request, read if none is waiting; or an exit status (EOF, a frame
        that breaks the protocol). Called with the reader's lock held."""
        frames = self._frames
        while not frames:
            try:
                data = os.read(self._in_fd, READ_SIZE)
            except InterruptedError:
                continue
            if not data:
                if self._adopt is not None and self._await_daemon():
                    continue
                log.info("end of input; finalizing the module")
                self.finish()
                return None, 0
            try:
                frames.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                log.error("protocol error from the daemon: %s; exiting", exc)
                self.finish()
                return None, 1
        return frames.popleft(), None

    def _await_daemon(self) -> bool:
        """The daemon's link ended: waits for a restarted daemon on the ADOPTABLE
        socket; True once one took this helper (the link is then its socket). Called
        with the reader's lock held: no request is read meanwhile; the data plane and
        the calls already inside the module go on."""
        assert self._adopt is not None
        listener, token, uid, wait, app = self._adopt
        with self._write_lock:
            self._link += 1
            self._out_broken = True
        for fd in {self._in_fd, self._out_fd}:
            os.close(fd)
        self._frames.clear()
        log.info("the daemon is gone; waiting up to %g s for a restarted one", wait)
        try:  # and for no longer than the application lives
            app_fd = os.pidfd_open(app)
        except OSError:
            log.info("the application (pid %d) is gone too", app)
            return self._no_daemon()
        deadline = time.monotonic() + wait
        try:
            while (left := deadline - time.monotonic()) > 0:
                ready = select.select([listener.fileno(), app_fd], [], [], left)[0]
                if not ready:
                    break
                if app_fd in ready:
                    log.info("the application (pid %d) ended", app)
                    return self._no_daemon()
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                if self._accept_daemon(conn, token, uid):
                    return True
        finally:
            os.close(app_fd)
        log.info("no daemon took this helper within %g s", wait)
        return self._no_daemon()

    def _no_daemon(self) -> bool:
        """The helper ends: its module is finalized next (a module that hangs there
        does not keep it)."""
        threading.Timer(self._grace + 10.0, os._exit, (1,)).start()
        return False

    def _accept_daemon(self, conn: socket.socket, token: bytes, uid: int) -> bool:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            peer_pid, peer_uid, _ = struct.unpack("3i", creds)
            conn.settimeout(2.0)
            got = b""
            while len(got) < len(token):
                chunk = conn.recv(len(token) - len(got))
                if not chunk:
                    break
                got += chunk
            if peer_uid != uid or not hmac.compare_digest(got, token):
                log.warning("refused a connection on the adoption socket (pid %d uid %d)",
                            peer_pid, peer_uid)
                conn.close()
                return False
            conn.setblocking(True)
        except OSError as exc:
            log.warning("adoption socket: %s", exc)
            conn.close()
            return False
        fd = conn.detach()
        self._in_fd = self._out_fd = fd
        self._decoder = FrameDecoder(self._decoder.max_frame)
        with self._write_lock:
            self._out_broken = False
        log.info("taken by a restarted daemon (pid %d)", peer_pid)
        self.send([0, CKR_OK, self._pid, PLANE_FEATURES])
        return True

    def _adoptable(self, args: list[Any]) -> int:
        if self._adopt is not None:
            self._adopt[0].close()
            self._adopt = None
        if not args:  # back to the warm pool: the next application is another
            self.kept.wipe()
            self.kept_key.wipe()
            return CKR_OK
        if (len(args) != 6 or type(args[5]) is not bytes or len(args[5]) != 32
                or type(args[0]) is not bytes or not 0 < len(args[0]) <= 100
                or type(args[1]) is not bytes or len(args[1]) != 16
                or type(args[2]) is not int or not 0 <= args[2] < 1 << 32
                or type(args[3]) is not int or not 0 < args[3] < 1 << 32
                or type(args[4]) is not int or not 0 < args[4] < 1 << 32):
            return CKR_ARGUMENTS_BAD
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(b"\0" + args[0])
            listener.listen(4)
        except OSError as exc:
            listener.close()
            log.warning("cannot listen for a restarted daemon: %s", exc)
            return CKR_FUNCTION_FAILED
        # no longer dies with the fork server (which dies with the daemon); set by the
        # fork server in the main thread, and the kernel sends it for that thread. The
        # answer waits for it: a daemon that stops right after it (a keeper, Resume.
        # keepers) kills the fork server, and the signal would still come
        unset = threading.Event()

        def outlive_the_fork_server() -> None:
            if _libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0) == 0:
                unset.set()
        self._main.put(outlive_the_fork_server)
        if not unset.wait(_UNSET_WAIT):
            listener.close()
            log.warning("cannot outlive the daemon: PR_SET_PDEATHSIG not cleared")
            return CKR_FUNCTION_FAILED
        self._adopt = (listener, args[1], args[2], args[3] / 1000.0, args[4])
        self.kept_key.keep(0, args[5])
        return CKR_OK

    def _keep_login(self, name: str, args: list[Any], rv: int) -> None:
        """Follows the PIN of the application's login (C_Login, C_SetPIN, C_Logout)."""
        if name == "C_Login" and rv in (CKR_OK, CKR_USER_ALREADY_LOGGED_IN) and len(args) == 3 \
                and type(args[1]) is int and args[1] != CKU_CONTEXT_SPECIFIC \
                and type(args[2]) is bytes:
            self.kept.keep(args[1], args[2])
        elif name == "C_Logout" and rv == CKR_OK:
            self.kept.wipe()
        elif name == "C_SetPIN" and rv == CKR_OK and len(args) == 3 and type(args[2]) is bytes:
            kept = self.kept.get()
            if kept is not None and kept[1] == args[1]:
                self.kept.keep(kept[0], args[2])

    def dispatch(self, frame: Any, link: int | None = None) -> int | None:
        """Handles one request, counted as busy since it was taken (so a C_Finalize
        read after it waits for it); an exit status when the helper must stop."""
        if (type(frame) is not list or not frame or type(frame[0]) is not int
                or not 1 <= frame[0] <= CALL_ID_MAX):
            self._release()
            log.error("request without a readable call id; exiting")
            self.finish()
            return 1
        call_id = frame[0]
        code = frame[1] if len(frame) > 1 else None
        plan = self._plans.get(code) if type(code) is int else None
        if plan is not None and plan.blocking:  # C_WaitForSlotEvent: C_Finalize does not wait
            self._release()
            self._work(call_id, plan, frame[2:], link)
            return None
        if code == C_FINALIZE and len(frame) == 2:
            self._release()
            rv = self.finish()
            self.send([call_id, rv], link)
            return 0
        try:
            if plan is not None:
                self._work(call_id, plan, frame[2:], link)
            elif type(code) is not int:
                log.warning("call %d: request without a function code", call_id)
                self.send([call_id, CKR_ARGUMENTS_BAD], link)
            elif code == PING:
                self.send([call_id, CKR_OK, self._pid], link)
            elif code == ADOPTABLE:
                self.send([call_id, self._adoptable(frame[2:])], link)
            elif code == KEEP:
                ok = (len(frame) == 4 and type(frame[2]) is int and type(frame[3]) is bytes
                      and len(frame[3]) <= PIN_MAX)
                if ok:
                    self.kept.keep(frame[2], frame[3])
                self.send([call_id, CKR_OK if ok else CKR_ARGUMENTS_BAD], link)
            elif code == KEPT:
                key = self.kept_key.get() if len(frame) == 2 else None
                pin = self.kept.get() if key else None
                self.send([call_id, CKR_OK, *([key[1]] if key else []), *(pin or ())], link)
            elif code in (FAST_START, FAST_ALLOW, FAST_REVOKE, FAST_SERVED, FAST_STUCK):
                self.send([call_id, *self._fast(code, frame[2:])], link)
            elif code == RECYCLE:
                self.send([call_id, *self._recycle(frame[2:])], link)
            elif code == C_INITIALIZE:
                self.send([call_id, CKR_CRYPTOKI_ALREADY_INITIALIZED], link)
            elif code == C_FINALIZE:
                self.send([call_id, CKR_ARGUMENTS_BAD], link)
            else:
                self.send([call_id, CKR_FUNCTION_NOT_SUPPORTED], link)
        finally:
            self._release()
        return None

    def _release(self) -> None:
        with self._idle:
            self._busy -= 1
            if self._busy == 0:
                self._idle.notify_all()

    def _fast(self, code: int, args: list[Any]) -> list[Any]:
        """The daemon's commands for the data plane."""
        lib = self._lib
        if code == FAST_START:
            if (len(args) != 3 or type(args[0]) is not bytes or not 0 < len(args[0]) <= 100
                    or type(args[1]) is not bytes or len(args[1]) != 16
                    or type(args[2]) is not int or not 0 <= args[2] < 1 << 32):
                return [CKR_ARGUMENTS_BAD]
            lib.p11p_fast_limit(MAX_OUTPUT)  # outputs bounded as on this pipe
            err = lib.p11p_fast_start(args[0], len(args[0]), args[1], args[2])
            if err:
                log.warning("data plane: cannot listen: %s", os.strerror(err))
                return [CKR_FUNCTION_FAILED]
            return [CKR_OK]
        if code == FAST_SERVED:
            return [CKR_OK, lib.p11p_fast_served()] if not args else [CKR_ARGUMENTS_BAD]
        if code == FAST_STUCK:
            return [CKR_OK, lib.p11p_fast_stuck()] if not args else [CKR_ARGUMENTS_BAD]
        if len(args) != 1 or type(args[0]) is not int or not 0 <= args[0] < 1 << 64:
            return [CKR_ARGUMENTS_BAD]
        if code == FAST_ALLOW:
            fast_id = lib.p11p_fast_allow(args[0])
            return [CKR_OK, fast_id] if fast_id else [CKR_SESSION_COUNT]
        lib.p11p_fast_revoke(args[0])
        return [CKR_OK]

    def _recycle(self, args: list[Any]) -> list[Any]:
        if (len(args) != 4 or type(args[0]) is not int or not 0 <= args[0] < 1 << 64
                or type(args[1]) is not bytes):
            return [CKR_ARGUMENTS_BAD]
        slot, name = args[0], args[1]
        self._adoptable([])
        if name and (rv := self._fast(FAST_START, args[1:])[0]) != CKR_OK:
            return [rv]
        try:
            rv = self._plans[_CODES["C_CloseAllSessions"]].run([slot])[0]
            if rv != CKR_OK:
                return [rv]
            rv, session = self._plans[_CODES["C_OpenSession"]].run([slot, CKF_SERIAL_SESSION, 0])
            if rv != CKR_OK:
                return [rv]
            rv, info = self._plans[_CODES["C_GetSessionInfo"]].run([session, 0])
            closed = self._plans[_CODES["C_CloseSession"]].run([session])[0]
        except Exception as exc:  # noqa: BLE001 - a module that raised: it is not clean
            return [rv_for(exc, "RECYCLE", False)]
        if rv != CKR_OK or closed != CKR_OK:
            return [rv if rv != CKR_OK else closed]
        return [CKR_OK, info[1]]

    # -- one call, in the worker that read it ------------------------------------------

    def _work(self, call_id: int, plan: Plan, args: list[Any], link: int | None = None) -> None:
        try:
            reply = plan.run(args)
        except Exception as exc:
            reply = [rv_for(exc, plan.name, plan.secret)]
        if plan.secret or plan.name == "C_Logout":
            self._keep_login(plan.name, args, reply[0])
        reply.insert(0, call_id)
        try:
            self.send(reply, link)
        except Exception as exc:  # an output that cannot be encoded
            self.send([call_id, rv_for(exc, plan.name, plan.secret)], link)

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> int:
        """Stops taking calls, waits for running ones (up to the grace period) and
        finalizes the module; the C_Finalize return value. Once only: a second caller
        waits here until the process exits."""
        self._ending.acquire()
        with self._idle:
            if not self._idle.wait_for(lambda: self._busy == 0, self._grace):
                log.warning("%d calls still running after %g s; finalizing anyway",
                            self._busy, self._grace)
        self.kept.wipe()
        self.kept_key.wipe()
        self._lib.p11p_fast_stop(int(self._grace * 1000))
        rv: int = self._lib.p11p_C_Finalize()
        if rv != CKR_OK:
            log.warning("C_Finalize returned %s", describe_rv(rv))
        return rv
