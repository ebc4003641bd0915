"""The helper's I/O loop: frames in on stdin, calls into a thread pool, replies out on
stdout (protocol/README.md, "Helper link").

The main thread reads and decodes requests `[call_id, code, arg...]` and answers the
helper's own codes (PING, C_Initialize, unknown codes, requests of the wrong shape) at
once; every module call runs in a worker thread, which writes `[call_id, rv, out...]`
under a lock, one write per frame, so replies come back in any order. C_Finalize, EOF
or a frame that breaks the protocol ends the process: calls still running get a grace
period, then the module is finalized.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from p11p.helper.calls import Plan
from p11p.helper.errors import (
    CKR_ARGUMENTS_BAD,
    CKR_CRYPTOKI_ALREADY_INITIALIZED,
    CKR_FUNCTION_NOT_SUPPORTED,
    CKR_OK,
    describe_rv,
    log,
    rv_for,
)
from p11p.protocol.framing import FrameDecoder, ProtocolError, encode

PING = -1
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
        self._max_request = max_request
        self._grace = finalize_grace
        self._pid = os.getpid()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="p11p-call")
        self._write_lock = threading.Lock()
        self._out_broken = False
        # calls submitted and not yet answered (blocking ones apart): C_Finalize waits
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
        decoder = FrameDecoder(self._max_request)
        while True:
            try:
                data = os.read(self._in_fd, READ_SIZE)
            except InterruptedError:
                continue
            if not data:
                log.info("end of input; finalizing the module")
                self.finish()
                return 0
            try:
                frames = decoder.feed(data)
            except ProtocolError as exc:
                log.error("protocol error from the daemon: %s; exiting", exc)
                self.finish()
                return 1
            for frame in frames:
                status = self.dispatch(frame)
                if status is not None:
                    return status

    def dispatch(self, frame: Any) -> int | None:
        """Handles one request; an exit status when the helper must stop."""
        if (type(frame) is not list or not frame or type(frame[0]) is not int
                or not 1 <= frame[0] <= CALL_ID_MAX):
            log.error("request without a readable call id; exiting")
            self.finish()
            return 1
        call_id = frame[0]
        code = frame[1] if len(frame) > 1 else None
        if type(code) is not int:
            log.warning("call %d: request without a function code", call_id)
            self.send([call_id, CKR_ARGUMENTS_BAD])
            return None
        plan = self._plans.get(code)
        if plan is not None:
            if not plan.blocking:
                with self._idle:
                    self._busy += 1
            self._pool.submit(self._work, call_id, plan, frame[2:])
        elif code == PING:
            self.send([call_id, CKR_OK, self._pid])
        elif code == C_INITIALIZE:
            self.send([call_id, CKR_CRYPTOKI_ALREADY_INITIALIZED])
        elif code == C_FINALIZE:
            if len(frame) != 2:
                self.send([call_id, CKR_ARGUMENTS_BAD])
                return None
            rv = self.finish()
            self.send([call_id, rv])
            return 0
        else:
            self.send([call_id, CKR_FUNCTION_NOT_SUPPORTED])
        return None

    # -- one call, in a worker thread ---------------------------------------------------

    def _work(self, call_id: int, plan: Plan, args: list[Any]) -> None:
        try:
            try:
                reply = plan.run(args)
            except Exception as exc:
                reply = [rv_for(exc, plan.name, plan.secret)]
            reply.insert(0, call_id)
            try:
                self.send(reply)
            except Exception as exc:  # an output that cannot be encoded
                self.send([call_id, rv_for(exc, plan.name, plan.secret)])
        finally:
            if not plan.blocking:
                with self._idle:
                    self._busy -= 1
                    if self._busy == 0:
                        self._idle.notify_all()

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> int:
        """Stops taking calls, waits for running ones (up to the grace period) and
        finalizes the module; the C_Finalize return value. Once only: a second caller
        waits here until the process exits."""
        self._ending.acquire()
        self._pool.shutdown(wait=False)
        with self._idle:
            if not self._idle.wait_for(lambda: self._busy == 0, self._grace):
                log.warning("%d calls still running after %g s; finalizing anyway",
                            self._busy, self._grace)
        rv: int = self._lib.p11p_C_Finalize()
        if rv != CKR_OK:
            log.warning("C_Finalize returned %s", describe_rv(rv))
        return rv
