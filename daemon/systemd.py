"""systemd integration without libsystemd: readiness (sd_notify) and socket activation.

`Type=notify`: READY=1 goes to $NOTIFY_SOCKET once the client socket listens and the
members were probed. Socket activation: with LISTEN_PID equal to our pid and
LISTEN_FDS >= 1, fd 3 is the listening client socket (`systemd/p11p.socket`).
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Sends `state` (e.g. "READY=1") to the service manager, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us, or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children (the helpers)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise SystemExit("p11p: the inherited socket is not an AF_UNIX stream socket")
    sock.setblocking(False)
    os.set_inheritable(sock.fileno(), False)
    return sock
