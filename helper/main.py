"""The helper process: one vendor module, calls from the daemon over stdin/stdout.

Reads frames `[call_id, code, arg...]` from stdin, runs each call in a thread pool
(cffi releases the GIL during the module's call, so calls run concurrently), writes
`[call_id, rv, out...]` to stdout. Dumb on purpose: no policy, no handle mapping; a
crash or hang of the vendor code stays in this process.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from p11p.helper.convert import BadArgument, Converters, _ulong, plan
from p11p.helper.ffi import load, shim_functions
from p11p.protocol.constants import CKR
from p11p.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, ProtocolError, encode

log = logging.getLogger("p11p.helper")
PING = -1
C_INITIALIZE = 1
C_FINALIZE = 2
CKR_OK = CKR["CKR_OK"]
CKR_ARGUMENTS_BAD = CKR["CKR_ARGUMENTS_BAD"]
CKR_FUNCTION_FAILED = CKR["CKR_FUNCTION_FAILED"]


class Helper:
    def __init__(self, module_path: str) -> None:
        self.ffi, self.lib = load()
        self.module_path = module_path
        conv = Converters(self.ffi)
        # code -> (C function, [(to_c, from_c)], name), built once
        self.calls: dict[int, tuple[Any, list[tuple[Any, Any]], str]] = {
            fn.code: (getattr(self.lib, f"p11p_{fn.name}"), plan(conv, fn), fn.name)
            for fn in shim_functions()
        }
        self._write_lock = threading.Lock()
        threads = int(os.environ.get("P11P_HELPER_THREADS", "32"))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="call")
        self.finalizing = threading.Event()

    # -- start ------------------------------------------------------------------------

    def start(self) -> bool:
        error = self.ffi.new("char[]", 512)
        if self.lib.p11p_load(self.module_path.encode(), error, 512) != 0:
            self.send([0, CKR["CKR_GENERAL_ERROR"], self.ffi.string(error).decode(errors="replace")])
            return False
        rv = self.lib.p11p_initialize()
        if rv != CKR_OK:
            self.send([0, rv, "C_Initialize failed"])
            return False
        self.send([0, CKR_OK, os.getpid()])
        return True

    # -- I/O --------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        data = encode(obj)
        with self._write_lock:
            view = memoryview(data)
            while view:
                n = os.write(1, view)
                view = view[n:]

    def serve(self) -> None:
        decoder = FrameDecoder(DEFAULT_MAX_FRAME + 1024)
        while True:
            try:
                data = os.read(0, 1 << 20)
            except InterruptedError:
                continue
            if not data:
                break  # EOF: the daemon is gone or done with us
            try:
                frames = decoder.feed(data)
            except ProtocolError as exc:
                log.error("protocol error from the daemon: %s", exc)
                break
            for frame in frames:
                if not (type(frame) is list and len(frame) >= 2 and type(frame[0]) is int
                        and type(frame[1]) is int):
                    log.error("malformed request from the daemon")
                    self.shutdown()
                    return
                code = frame[1]
                if code == C_FINALIZE:
                    self.pool.shutdown(wait=True)
                    rv = self._finalize()
                    self.send([frame[0], rv])
                    return
                if code == PING:
                    self.send([frame[0], CKR_OK, os.getpid()])
                elif code == C_INITIALIZE:
                    self.send([frame[0], CKR["CKR_CRYPTOKI_ALREADY_INITIALIZED"]])
                else:
                    self.pool.submit(self.run, frame)
        self.shutdown()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        self._finalize()

    def _finalize(self) -> int:
        if self.finalizing.is_set():
            return CKR_OK
        self.finalizing.set()
        rv: int = self.lib.p11p_C_Finalize()
        return rv

    # -- one call ---------------------------------------------------------------------

    def run(self, frame: list[Any]) -> None:
        call_id, code = frame[0], frame[1]
        entry = self.calls.get(code)
        if entry is None:
            self.send([call_id, CKR["CKR_FUNCTION_NOT_SUPPORTED"]])
            return
        func, steps, name = entry
        args = frame[2:]
        if len(args) != len(steps):
            self.send([call_id, CKR_ARGUMENTS_BAD])
            return
        try:
            keep: list[Any] = []
            c_args: list[Any] = []
            outputs: list[tuple[Any, Any]] = []
            for (to_c, from_c), value in zip(steps, args, strict=True):
                if to_c is None:
                    c_args.append(_ulong(value))
                elif from_c is None:
                    c_args += to_c(value, keep)
                else:
                    c, state = to_c(value, keep)
                    c_args += c
                    outputs.append((from_c, state))
            rv = func(*c_args)
            reply = [call_id, rv]
            for from_c, state in outputs:
                reply.append(from_c(rv, state))
        except (BadArgument, OverflowError, TypeError) as exc:
            log.debug("%s: bad argument: %s", name, exc)  # never the values: they may be PINs
            self.send([call_id, CKR_ARGUMENTS_BAD])
            return
        except Exception:
            log.error("%s: internal error\n%s", name, traceback.format_exc())
            self.send([call_id, CKR_FUNCTION_FAILED])
            return
        self.send(reply)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=os.environ.get("P11P_HELPER_LOG", "WARNING").upper(),
                        stream=sys.stderr, format="p11p-helper[%(process)d] %(levelname)s: %(message)s")
    if len(argv) != 2:
        print("usage: python3 -m p11p.helper MODULE_PATH", file=sys.stderr)
        return 2
    helper = Helper(argv[1])
    if not helper.start():
        return 1
    helper.serve()
    return 0
