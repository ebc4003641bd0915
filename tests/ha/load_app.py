"""A signing load through p11p-client.so: N threads, each with its own session, sign
with the imported ECDSA key for S seconds. Prints one JSON line: ops, errors, elapsed.
    python3 load_app.py MODULE LABEL PIN THREADS SECONDS"""

from __future__ import annotations

import ctypes as C
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ckraw import CK_ULONG, CKA, CKM, Module, mechanism, template  # noqa: E402


def main() -> None:
    module, label, pin, threads, seconds = sys.argv[1:6]
    m = Module(module)
    assert m.initialize() == 0
    slot = next(s for s in m.slots() if _label(m, s) == label.encode())
    base = m.open_session(slot)
    assert m.login(base, pin.encode()) == 0
    t, n, keep = template((CKA["CKA_LABEL"], b"ha-ec"), (CKA["CKA_CLASS"], 3))
    assert m.C_FindObjectsInit(base, t, n) == 0
    out, count = (CK_ULONG * 2)(), CK_ULONG()
    assert m.C_FindObjects(base, out, 2, C.byref(count)) == 0 and count.value == 1
    m.C_FindObjectsFinal(base)
    key = out[0]
    ops = [0] * int(threads)
    errors: list[str] = []
    stop = time.monotonic() + float(seconds)

    def worker(i: int) -> None:
        h = m.open_session(slot)
        mech, _ = mechanism(CKM["CKM_ECDSA"])
        sig = (C.c_ubyte * 64)()
        digest = os.urandom(32)
        while time.monotonic() < stop:
            rv = m.C_SignInit(h, C.byref(mech), key)
            if rv == 0:
                ln = CK_ULONG(64)
                rv = m.C_Sign(h, digest, 32, sig, C.byref(ln))
            if rv != 0:
                errors.append(f"{rv:#x}")
                continue
            ops[i] += 1
        m.C_CloseSession(h)

    start = time.monotonic()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(int(threads))]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    elapsed = time.monotonic() - start
    print(json.dumps({"ops": sum(ops), "errors": len(errors), "first_errors": errors[:5],
                      "elapsed": elapsed}), flush=True)
    m.C_Finalize(None)


def _label(m: Module, slot: int) -> bytes:
    info = (C.c_ubyte * 512)()
    assert m.C_GetTokenInfo(slot, info) == 0
    return bytes(info[:32]).rstrip()


if __name__ == "__main__":
    main()
