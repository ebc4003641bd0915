"""`python3 -m p11p.helper MODULE_PATH`: start-up of the helper process.

Keeps the frame pipes away from the vendor module (fd 1 becomes stderr, fd 0
/dev/null, so a module that prints cannot break a frame), loads the compiled extension
and the module, calls C_Initialize (CKF_OS_LOCKING_OK), writes the ready frame
`[0, rv, pid, plane features]` (or `[0, rv, message]` and exits 1), then serves calls (loop.py).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from p11p.helper.errors import CKR_GENERAL_ERROR, CKR_OK, describe_rv, log, setup_logging
from p11p.helper.settings import PLANE_FEATURES
from p11p.protocol.framing import encode

if TYPE_CHECKING:
    from p11p.helper.calls import Plan


def _take_pipes() -> tuple[int, int]:
    """Private copies of stdin/stdout for the frames; fds 0 and 1 are given away."""
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return in_fd, out_fd


def _ready(out_fd: int, rv: int, detail: object, *more: object) -> None:
    frame = encode([0, rv, detail, *more])
    view = memoryview(frame)
    while view:
        view = view[os.write(out_fd, view):]


def _exit(status: int) -> None:
    """Leaves without waiting for worker threads (one may be blocked in the module)."""
    for handler in log.handlers:
        handler.flush()
    os._exit(status)


def main(argv: list[str]) -> int:
    module_path = argv[1] if len(argv) == 2 else ""
    setup_logging(module_path)
    in_fd, out_fd = _take_pipes()
    if not module_path:
        log.error("usage: python3 -m p11p.helper MODULE_PATH")
        _ready(out_fd, CKR_GENERAL_ERROR, "usage: python3 -m p11p.helper MODULE_PATH")
        return 2
    return run(module_path, in_fd, out_fd)


def run(module_path: str, in_fd: int, out_fd: int, plans: dict[int, Plan] | None = None) -> int:
    """Loads and initializes the module, writes the ready frame, serves calls until the
    daemon ends the link; the exit status. Also the body of a helper forked by the fork
    server (forkserver.py), which has imported everything up to the module already and
    made the call table (`plans`)."""
    try:
        from p11p.helper import calls, settings
        from p11p.helper.ffi import ffi, lib
        from p11p.helper.loop import Server
        if plans is None:
            plans = calls.plans(lib)
    except Exception as exc:
        log.error("cannot load the compiled Cryptoki extension: %s", exc)
        _ready(out_fd, CKR_GENERAL_ERROR, f"helper extension: {exc}")
        return 1

    error = ffi.new("char[]", 1024)
    if lib.p11p_load(module_path.encode(), error, len(error)) != 0:
        message = ffi.string(error).decode(errors="replace")
        log.error("cannot load the module: %s", message)
        _ready(out_fd, CKR_GENERAL_ERROR, message)
        return 1
    rv = lib.p11p_initialize()
    if rv != CKR_OK:
        log.error("C_Initialize returned %s", describe_rv(rv))
        _ready(out_fd, rv, f"C_Initialize returned {describe_rv(rv)}")
        return 1
    log.info("module loaded and initialized; %d worker threads", settings.THREADS)
    _ready(out_fd, CKR_OK, os.getpid(), PLANE_FEATURES)
    server = Server(lib, plans, in_fd, out_fd, settings.THREADS, settings.MAX_REQUEST,
                    settings.FINALIZE_GRACE)
    return server.serve()


if __name__ == "__main__":
    _exit(main(sys.argv))
