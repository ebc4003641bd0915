"""A signing load through p11p-client.so: N threads, each with its own session, sign
with the imported ECDSA key for S seconds. Prints one JSON line: ops, errors, elapsed,
the slowest signature (init + sign) in seconds. With KEYS (make_keys' JSON file) every
signature is verified with the public key; one that does not verify is an error. With
LOAD_UNTIL=PATH in the environment the load ends once PATH exists (SECONDS at most).
    python3 load_app.py MODULE LABEL PIN THREADS SECONDS [KEYS]"""

from __future__ import annotations

import ctypes as C
import json
import os
import sys
import threading
import time
from collections.abc import Callable

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
    slowest = [0.0] * int(threads)
    stop = [time.monotonic() + float(seconds)]
    verify = _verifier(sys.argv[6]) if len(sys.argv) > 6 else None

    def worker(i: int) -> None:
        h = m.open_session(slot)
        mech, _ = mechanism(CKM["CKM_ECDSA"])
        sig = (C.c_ubyte * 64)()
        digest = os.urandom(32)
        while time.monotonic() < stop[0]:
            begun = time.monotonic()
            rv = m.C_SignInit(h, C.byref(mech), key)
            if rv == 0:
                ln = CK_ULONG(64)
                rv = m.C_Sign(h, digest, 32, sig, C.byref(ln))
            slowest[i] = max(slowest[i], time.monotonic() - begun)
            if rv != 0:
                errors.append(f"{rv:#x}")
                continue
            if verify is not None and not verify(digest, bytes(sig[:ln.value])):
                errors.append("bad-signature")
                continue
            ops[i] += 1
        m.C_CloseSession(h)

    start = time.monotonic()
    until = os.environ.get("LOAD_UNTIL")
    if until:
        threading.Thread(target=_watch, args=(until, stop), daemon=True).start()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(int(threads))]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    elapsed = time.monotonic() - start
    print(json.dumps({"ops": sum(ops), "errors": len(errors), "first_errors": errors[:5],
                      "elapsed": elapsed, "slowest": max(slowest)}), flush=True)
    m.C_Finalize(None)


def _watch(path: str, stop: list[float]) -> None:
    while time.monotonic() < stop[0]:
        if os.path.exists(path):
            stop[0] = time.monotonic()
            return
        time.sleep(0.02)


def _verifier(keys: str) -> Callable[[bytes, bytes], bool]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    with open(keys) as f:
        pub = serialization.load_pem_public_key(json.load(f)["ec_public"].encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)

    def verify(digest: bytes, sig: bytes) -> bool:
        der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                         int.from_bytes(sig[32:], "big"))
        try:
            pub.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        except InvalidSignature:
            return False
        return len(sig) == 64
    return verify


def _label(m: Module, slot: int) -> bytes:
    info = (C.c_ubyte * 512)()
    assert m.C_GetTokenInfo(slot, info) == 0
    return bytes(info[:32]).rstrip()


if __name__ == "__main__":
    main()
