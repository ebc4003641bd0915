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
"""

from __future__ import annotations

import os
import threading
from collections import deque
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
from p11p.helper.settings import MAX_OUTPUT
from p11p.protocol.framing import FrameDecoder, ProtocolError, encode
from p11p.protocol.spec import own_codes

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
C_INITIALIZE = 1
C_FINALIZE = 2
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
        # calls taken and not yet answered (blocking ones apart): C_Finalize waits
        self._busy = 0
        self._idle = threading.Condition()
        self._ending = threading.Lock()

    # -- output -----------------------------------------------------------------------

    def send(self, reply: list[Any]) -> None:
        """Writes one frame; the whole frame, under the lock, so frames never mix."""
        frame = encode(reply)
        with self._write_lock:
            if self._out_broken:
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
        """Runs until C_Finalize, EOF or a protocol error; returns the exit status."""
        self._start_worker()
        self._done.wait()
        assert self._status is not None
        return self._status

    def _start_worker(self) -> None:
        with self._workers:
            self._started += 1
            name = f"p11p-call_{self._started - 1}"
        threading.Thread(target=self._worker, name=name, daemon=True).start()

    def _stop(self, status: int) -> None:
        if self._status is None:
            self._status = status
        self._done.set()

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
                if status is None:
                    with self._idle:
                        self._busy += 1
            if status is not None:
                self._stop(status)
                return
            # someone must read while this worker runs its call
            if spawn:
                self._start_worker()
            status = self.dispatch(frame)
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

    def dispatch(self, frame: Any) -> int | None:
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
            self._work(call_id, plan, frame[2:])
            return None
        if code == C_FINALIZE and len(frame) == 2:
            self._release()
            rv = self.finish()
            self.send([call_id, rv])
            return 0
        try:
            if plan is not None:
                self._work(call_id, plan, frame[2:])
            elif type(code) is not int:
                log.warning("call %d: request without a function code", call_id)
                self.send([call_id, CKR_ARGUMENTS_BAD])
            elif code == PING:
                self.send([call_id, CKR_OK, self._pid])
            elif code in (FAST_START, FAST_ALLOW, FAST_REVOKE, FAST_SERVED, FAST_STUCK):
                self.send([call_id, *self._fast(code, frame[2:])])
            elif code == C_INITIALIZE:
                self.send([call_id, CKR_CRYPTOKI_ALREADY_INITIALIZED])
            elif code == C_FINALIZE:
                self.send([call_id, CKR_ARGUMENTS_BAD])
            else:
                self.send([call_id, CKR_FUNCTION_NOT_SUPPORTED])
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

    # -- one call, in the worker that read it ------------------------------------------

    def _work(self, call_id: int, plan: Plan, args: list[Any]) -> None:
        try:
            reply = plan.run(args)
        except Exception as exc:
            reply = [rv_for(exc, plan.name, plan.secret)]
        reply.insert(0, call_id)
        try:
            self.send(reply)
        except Exception as exc:  # an output that cannot be encoded
            self.send([call_id, rv_for(exc, plan.name, plan.secret)])

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
        self._lib.p11p_fast_stop(int(self._grace * 1000))
        rv: int = self._lib.p11p_C_Finalize()
        if rv != CKR_OK:
            log.warning("C_Finalize returned %s", describe_rv(rv))
        return rv
