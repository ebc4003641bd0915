"""The helper's settings, read once from its environment (the member's environment as
the daemon passes it)."""

from __future__ import annotations

import os

from p11p.protocol.framing import DEFAULT_MAX_FRAME


def _int(name: str, default: int, minimum: int) -> int:
    try:
        return max(int(os.environ.get(name, default)), minimum)
    except ValueError:
        return default


# Worker threads: calls of one helper run concurrently up to this many.
THREADS = _int("P11P_HELPER_THREADS", 32, 1)
# The largest frame the daemon may send (requests carry the application's data).
MAX_REQUEST = _int("P11P_MAX_FRAME", DEFAULT_MAX_FRAME, 1 << 16) + (1 << 20)
# The largest output one call may produce: a reply must fit the daemon's frame limit.
# Output capacities above it are lowered to it (an output that fits is written the same;
# a larger one gets CKR_BUFFER_TOO_SMALL with its length, which can travel).
MAX_OUTPUT = _int("P11P_MAX_FRAME", DEFAULT_MAX_FRAME, 1 << 16) - (1 << 12)
# Seconds that C_Finalize waits for calls still running (C_WaitForSlotEvent excepted).
FINALIZE_GRACE = _int("P11P_HELPER_FINALIZE_GRACE", 5, 0)
# What the data plane takes beyond one request at a time, told in the ready frame (the
# daemon passes it on in DIRECT_BIND): the client's CPU in the request header (fast.c,
# follow), a pair of requests sent at once, answered at once (fast.c, next_request), and
# a connection's mailbox in shared memory (fast_conn.c, protocol/p11p-box.h).
PLANE_FEATURES = ["cpu_hint", "pairs", "mailbox"]
