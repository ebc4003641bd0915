"""`python3 -m p11p.helper.forkserver DAEMON_PID MEMBER`: a member's fork server.

The daemon starts one per member, with the environment a helper of that member gets. It
imports what a helper needs up to the vendor module (the interpreter, msgpack, cffi, the
compiled extension, the call table, the I/O loop) once, then forks a helper per request:
a new application costs a fork, not an interpreter start. The vendor module is loaded
and initialized only after the fork, in the child: vendor code never runs here, so a
module that crashes takes its helper only. No thread runs here (the helper's worker
threads and fast.c's start in the child). A helper's environment is this process's own:
the daemon starts a server per member and environment, so what is read here from the
environment (the call table's output bound, the log level) is what the helper would read.

What a helper costs is mostly what it does not share with this process: every page that
either writes after the fork is copied (refcounts, allocations, the interpreter's own
counters). So all that can be made before the fork is made here (the call table, the
log handler, OpenSSL's cipher methods), the garbage collector is off from the start and
never collects here (a collection leaves holes in shared pages that the children's
allocations would then write into; `gc.freeze` before serving keeps the children's
collections off these objects, as the gc module's documentation advises), and the
child does as little as it can before it serves. A page this process writes after a
fork is the new helper's alone (it keeps the page as it was when forked, this process
takes a copy): so the request loop's common path (read a request, fork, answer, reap)
is C (fork_loop.c), which writes no Python object, and Python runs here between two
forks only for rare events (SIGTERM, the link's end, a malformed request, a failed
fork); the signals are caught in C too, so that a helper resets them without the
signal module's Python. Nor does a helper's malloc() take the free chunks of this
process's C heap (holes among pages in use, each copied for a few bytes): they are
taken here first, for good.

The link is fd 0 at start: one end of an AF_UNIX SOCK_SEQPACKET pair, one msgpack
message per packet (daemon/forkserver.py is the other end):

  server -> daemon   [0, pid]                                ready
  daemon -> server   [n, module] + fds (stdin, stdout)       fork helper n (n > 0)
  server -> daemon   [n, pid] + fd (a pidfd of it)           forked; it writes its
                                                             ready frame [0, rv, pid]
  server -> daemon   [n, 0, message]                         not forked
  server -> daemon   [-1, pid, status]                       a helper ended (waitpid)

A request bigger than 1 MiB is malformed.

The helpers' frames travel over the pipes passed with their request, as a helper
started as a process of its own. Each helper has a session of its own and dies with
this process (PR_SET_PDEATHSIG); this process dies with the daemon: at the link's EOF
(or SIGTERM, sent when the daemon dies) it waits up to END_GRACE for its helpers, whose
stdin closed with the daemon, to finalize their modules, and leaves.
"""

from __future__ import annotations

import gc

gc.disable()  # before anything is imported: no collection leaves holes in shared pages

import ctypes  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import msgpack  # noqa: E402
from p11p.helper import __main__ as helper_main  # noqa: E402
from p11p.helper import calls, settings  # noqa: E402, F401  (imported once, for the children)
from p11p.helper.calls import Plan  # noqa: E402
from p11p.helper.errors import log, setup_logging  # noqa: E402
from p11p.helper.ffi import ffi, lib  # noqa: E402
from p11p.helper.loop import Server  # noqa: E402, F401  (imported once, for the children)

END_GRACE = 5.0  # seconds the helpers get to end after the daemon did
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(sig: int, parent: int) -> None:
    """`sig` when the parent ends; ends now when it already has (the race of a fork)."""
    if _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(1)


class ForkServer:
    """The request loop (fork_loop.c, for its common path): forks helpers, reaps them,
    reports their ends."""

    def __init__(self, link: socket.socket, member: str, plans: dict[int, Plan]) -> None:
        self.link = link
        self.member = member
        self.plans = plans  # the call table, made once here for every child
        self.pid = os.getpid()
        self.ending_at: float | None = None  # the daemon ended: leave by this time
        # SIGCHLD and SIGTERM are written to this pipe (fork_loop.c), handled in the loop
        self._wake_r = lib.p11p_fork_signals()
        if self._wake_r < 0:
            raise OSError(ffi.errno, os.strerror(ffi.errno))

    def serve(self) -> int:
        """Until the daemon ends; in a forked helper, its life (it never returns)."""
        self._send([0, os.getpid()])
        request = ffi.new("struct p11p_fork_request *")
        link = self.link.fileno()
        while self.ending_at is None:
            # no Python runs from here to the next fork but for the rare events below;
            # the holes it left in the C heap are filled first
            lib.p11p_fork_fill_heap()
            event = lib.p11p_fork_serve(link, self._wake_r, request)
            if event == lib.P11P_FORK_CHILD:
                self._child(self.pid, ffi.unpack(request.module, request.module_len)
                            .decode("utf-8", "surrogateescape"), request.in_fd, request.out_fd)
            elif event == lib.P11P_FORK_SIGTERM:
                self._end("SIGTERM")
            elif event == lib.P11P_FORK_EOF:
                self._end("its link closed")
            elif event == lib.P11P_FORK_MALFORMED:
                log.error("fork server: malformed request; ignored")
                if request.number:
                    self._send([request.number, 0, "malformed fork request"])
            elif event == lib.P11P_FORK_FAILED:
                failed = OSError(request.error, os.strerror(request.error))
                self._send([request.number, 0, f"fork: {failed}"])
            else:
                raise OSError(request.error, os.strerror(request.error))
        # the daemon ended: its helpers, whose stdin closed with it, finalize their modules
        while lib.p11p_fork_reap(link) > 0:
            timeout = self.ending_at - time.monotonic()
            if timeout <= 0:
                log.warning("fork server: %d helpers still run %.3g s after the daemon "
                            "ended; those not waiting for a restarted one die with it",
                            lib.p11p_fork_children(), END_GRACE)
                break
            if select.select([self._wake_r], [], [], timeout)[0]:
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
        return 0

    def _end(self, why: str) -> None:
        if self.ending_at is None:
            log.info("fork server: the daemon ended (%s); %d helpers run", why,
                     lib.p11p_fork_children())
            self.ending_at = time.monotonic() + END_GRACE

    def _child(self, parent: int, module: str, in_fd: int, out_fd: int) -> None:
        """The helper, from the fork on: never returns."""
        status = 1
        try:
            gc.enable()  # on its own objects only: the server's are frozen
            os.setpgid(0, 0)  # a process group of its own, as a helper started by the daemon has
            _die_with_parent(signal.SIGKILL, parent)
            self.link.detach()
            _close_fds_but(in_fd, out_fd)
            # the log handler made in main(), now naming the module
            log.handlers[0].setFormatter(_helper_format(module))
            status = helper_main.run(module, in_fd, out_fd, self.plans)
        except BaseException as exc:  # nothing of the server's loop may run on here
            try:
                log.error("forked helper failed before serving: %r", exc)
            finally:
                status = 1
        finally:
            helper_main._exit(status)

    def _send(self, message: list[Any]) -> None:
        try:
            self.link.sendmsg([msgpack.packb(message)])
        except OSError:  # the daemon is gone: the loop sees the link's EOF
            pass


def _fetch_openssl_methods() -> None:
    """Fetches OpenSSL's cipher and random generator methods, here, once for all helpers.

    A module built on the system's OpenSSL 3 (SoftHSM2, among others) fetches a cipher
    in its C_Initialize (its random generator does); OpenSSL then makes every cipher
    of its provider at once and files them in tables this process made (Python's hashlib
    started OpenSSL here): some 300 kB per helper, new or written into pages shared with
    this process. Made here, they are shared. Methods only: no random generator is made
    here, each helper seeds its own. Nothing when Python's OpenSSL is not 3.x."""
    try:
        import _hashlib
        crypto = ctypes.CDLL(_hashlib.__file__)  # libcrypto's symbols, through it
        fetches = [(crypto.EVP_CIPHER_fetch, crypto.EVP_CIPHER_free, b"AES-256-CTR"),
                   (crypto.EVP_RAND_fetch, crypto.EVP_RAND_free, b"CTR-DRBG"),
                   (crypto.EVP_RAND_fetch, crypto.EVP_RAND_free, b"SEED-SRC")]
    except (ImportError, OSError, AttributeError):
        return
    for fetch, free, name in fetches:
        fetch.restype = ctypes.c_void_p
        fetch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        free.argtypes = [ctypes.c_void_p]
        free(fetch(None, name, None))


def _close_fds_but(*keep: int) -> None:
    """Closes every fd above 2 but `keep` (close_range(2), a system call per gap)."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _helper_format(module: str) -> logging.Formatter:
    # as errors.setup_logging's
    name = os.path.basename(module) or "?"
    return logging.Formatter(f"p11p-helper[%(process)d] module={name} %(levelname)s %(message)s")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python3 -m p11p.helper.forkserver DAEMON_PID MEMBER", file=sys.stderr)
        return 2
    daemon, member = int(argv[1]), argv[2]
    _die_with_parent(signal.SIGTERM, daemon)
    logging.basicConfig()  # nothing logs through the root logger; the helper's is set up
    setup_logging("")
    for handler in log.handlers:
        handler.setFormatter(logging.Formatter(
            f"p11p-forkserver[%(process)d] member={member} %(levelname)s %(message)s"))
    # the link is fd 0; fd 0 becomes /dev/null and fd 1 stderr, as in a helper
    link = socket.socket(fileno=os.dup(0))
    link.setblocking(True)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    plans = calls.plans(lib)  # the helpers' call table, shared with them
    _fetch_openssl_methods()
    # what is here now stays in pages the helpers share with this process; their
    # collections pass it over (no gc.collect() first: see the module's docstring)
    gc.freeze()
    return ForkServer(link, member, plans).serve()


if __name__ == "__main__":
    helper_main._exit(main(sys.argv))
