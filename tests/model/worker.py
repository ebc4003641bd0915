"""One application of the model-based differential tests: a process that loads one
PKCS#11 module with ctypes (tests/ckraw.py) and runs the driver's steps, one JSON line
in, one JSON line out.

    python3 worker.py MODULE TOKEN_LABEL        (environment: P11P_SOCKET or SOFTHSM2_CONF)

The driver names sessions and objects itself; this process keeps the names' real
handles, so the same step runs unchanged on p11p and on the token used directly. Bytes
travel as hex strings. Every reply carries each Cryptoki call's CK_RV.
"""

from __future__ import annotations

import ctypes as C
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ckraw import (  # noqa: E402
    CK_ATTRIBUTE,
    CK_C_INITIALIZE_ARGS,
    CK_MECHANISM,
    CK_ULONG,
    Module,
)
from p11p.protocol.constants import CKA, CKF, CKM, CKR  # noqa: E402

OK = CKR["CKR_OK"]
GENERAL_ERROR = CKR["CKR_GENERAL_ERROR"]
ATTRIBUTE_VALUE_INVALID = CKR["CKR_ATTRIBUTE_VALUE_INVALID"]
BOGUS = 0x5EADBEEF  # a handle no name has: what an application sends for one it lost
DESCRIBE = ("CKA_CLASS", "CKA_LABEL", "CKA_APPLICATION", "CKA_TOKEN")


class KDString(C.Structure):
    _fields_ = [("pData", C.c_void_p), ("ulLen", C.c_ulong)]


class SessionInfo(C.Structure):
    _fields_ = [("slotID", C.c_ulong), ("state", C.c_ulong), ("flags", C.c_ulong),
                ("ulDeviceError", C.c_ulong)]


def attr_value(v: Any) -> bytes:
    if isinstance(v, bool):
        return b"\x01" if v else b"\x00"
    if isinstance(v, int):
        return v.to_bytes(C.sizeof(C.c_ulong), "little")
    return bytes.fromhex(v)


class Worker:
    def __init__(self, module: str, label: str) -> None:
        self.m = Module(module)
        self.label = label
        self.slot = -1
        self.sessions: dict[str, int] = {}
        self.objects: dict[str, int] = {}
        self.names: dict[int, str] = {}

    # -- names ---------------------------------------------------------------------------

    def s(self, name: str) -> int:
        return self.sessions.get(name, BOGUS)

    def o(self, name: str | None) -> int:
        if name is None:
            return 0
        return self.objects.get(name, BOGUS)

    def bind(self, name: str, handle: int) -> None:
        self.objects[name] = handle
        self.names[handle] = name

    # -- building arguments --------------------------------------------------------------

    @staticmethod
    def template(pairs: list[list[Any]]) -> tuple[Any, int, list[Any]]:
        arr = (CK_ATTRIBUTE * max(len(pairs), 1))()
        keep: list[Any] = []
        for i, (name, value) in enumerate(pairs):
            raw = attr_value(value)
            buf = C.create_string_buffer(raw, max(len(raw), 1))
            keep.append(buf)
            arr[i].type, arr[i].pValue, arr[i].ulValueLen = CKA[name], C.cast(buf, C.c_void_p), len(raw)
        return arr, len(pairs), keep

    @staticmethod
    def mechanism(spec: dict[str, Any]) -> tuple[CK_MECHANISM, list[Any]]:
        keep: list[Any] = []
        mech = CK_MECHANISM(CKM[spec["m"]], None, 0)
        if spec.get("p") is not None:
            raw = bytes.fromhex(spec["p"])
            buf = C.create_string_buffer(raw, max(len(raw), 1))
            keep.append(buf)
            mech.pParameter, mech.ulParameterLen = C.cast(buf, C.c_void_p), len(raw)
        elif spec.get("kd") is not None:
            raw = bytes.fromhex(spec["kd"])
            buf = C.create_string_buffer(raw, max(len(raw), 1))
            kd = KDString(C.cast(buf, C.c_void_p), len(raw))
            keep += [buf, kd]
            mech.pParameter, mech.ulParameterLen = C.cast(C.pointer(kd), C.c_void_p), C.sizeof(kd)
        return mech, keep

    def out(self, fn: Any, args: list[Any], query: bool, cap: int = 4096) -> dict[str, Any]:
        """A call with an output buffer, with or without a length query first."""
        r: dict[str, Any] = {}
        n = CK_ULONG(cap)
        if query:
            n = CK_ULONG(0)
            rv = int(fn(*args, None, C.byref(n)))
            r["qrv"], r["qlen"] = rv, n.value
            if rv != OK or n.value > 1 << 20:  # an absurd length: compared, not allocated
                r["rv"] = rv
                return r
        buf = (C.c_ubyte * max(n.value, 1))()
        rv = int(fn(*args, buf, C.byref(n)))
        r["rv"] = rv
        if rv == OK:
            r["out"] = bytes(buf[: n.value]).hex()
        return r

    def new_object(self, rv: int, name: str, h: CK_ULONG) -> dict[str, Any]:
        if rv == OK:
            self.bind(name, h.value)
        return {"rv": rv}

    # -- steps ---------------------------------------------------------------------------

    def do(self, c: dict[str, Any]) -> dict[str, Any]:
        op = c["op"]
        return getattr(self, "op_" + op)(c)  # type: ignore[no-any-return]

    def op_pid(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"rv": OK, "pid": os.getpid()}

    def op_init(self, c: dict[str, Any]) -> dict[str, Any]:
        args = CK_C_INITIALIZE_ARGS(flags=CKF["CKF_OS_LOCKING_OK"])
        rv = int(self.m.C_Initialize(C.byref(args)))
        if rv == OK:
            self.slot = -1
            for slot in self.m.slots():
                info = (C.c_ubyte * 256)()  # CK_TOKEN_INFO: the label is its first 32 bytes
                if self.m.C_GetTokenInfo(slot, info) == OK and \
                        bytes(info[:32]).decode().strip() == self.label:
                    self.slot = slot
        return {"rv": rv, "slot_found": self.slot != -1}

    def op_finalize(self, c: dict[str, Any]) -> dict[str, Any]:
        rv = int(self.m.C_Finalize(None))
        self.sessions.clear()
        self.objects.clear()
        self.names.clear()
        return {"rv": rv}

    def op_open(self, c: dict[str, Any]) -> dict[str, Any]:
        h = CK_ULONG()
        flags = CKF["CKF_SERIAL_SESSION"] | (CKF["CKF_RW_SESSION"] if c.get("rw", True) else 0)
        rv = int(self.m.C_OpenSession(self.slot, flags, None, None, C.byref(h)))
        if rv == OK:
            self.sessions[c["s"]] = h.value
        return {"rv": rv}

    def op_close(self, c: dict[str, Any]) -> dict[str, Any]:
        rv = int(self.m.C_CloseSession(self.s(c["s"])))
        if rv == OK:
            self.sessions.pop(c["s"], None)
        return {"rv": rv}

    def op_closeall(self, c: dict[str, Any]) -> dict[str, Any]:
        rv = int(self.m.C_CloseAllSessions(self.slot))
        if rv == OK:
            self.sessions.clear()
        return {"rv": rv}

    def op_login(self, c: dict[str, Any]) -> dict[str, Any]:
        pin = c["pin"].encode()
        return {"rv": int(self.m.C_Login(self.s(c["s"]), 1, pin, len(pin)))}

    def op_logout(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"rv": int(self.m.C_Logout(self.s(c["s"])))}

    def op_sessinfo(self, c: dict[str, Any]) -> dict[str, Any]:
        info = SessionInfo()
        rv = int(self.m.C_GetSessionInfo(self.s(c["s"]), C.byref(info)))
        if rv != OK:
            return {"rv": rv}
        return {"rv": rv, "state": info.state, "flags": info.flags}

    def describe(self, session: int, h: int) -> str:
        """A found object: its name, or a name made from what tells it apart."""
        if h in self.names:
            return self.names[h]
        parts = []
        for name in DESCRIBE:
            arr = (CK_ATTRIBUTE * 1)()
            arr[0].type, arr[0].pValue, arr[0].ulValueLen = CKA[name], None, 0
            rv = self.m.C_GetAttributeValue(session, h, arr, 1)
            if rv == GENERAL_ERROR:
                # these reads are the harness's own (they name what a search found), and
                # a CKR_GENERAL_ERROR rule armed on a member may take one: README, Limits
                # ("with none left, the application gets the code"); the rule's count is
                # spent then, so it is read again, once
                rv = self.m.C_GetAttributeValue(session, h, arr, 1)
            if rv != OK:
                parts.append(f"?{rv:#x}")
                continue
            buf = (C.c_ubyte * max(arr[0].ulValueLen, 1))()
            arr[0].pValue = C.cast(buf, C.c_void_p)
            rv = self.m.C_GetAttributeValue(session, h, arr, 1)
            raw = bytes(buf[: arr[0].ulValueLen])
            if name in ("CKA_CLASS",):
                parts.append(str(int.from_bytes(raw, "little")))
            elif name == "CKA_TOKEN":
                parts.append("T" if raw == b"\x01" else "S")
            else:
                parts.append(raw.decode(errors="replace"))
        label = parts[1]
        name = label if label.startswith("m-") else "/".join(parts)
        self.bind(name, h)
        return name

    def op_find_init(self, c: dict[str, Any]) -> dict[str, Any]:
        t, n, _keep = self.template(c["t"])
        return {"rv": int(self.m.C_FindObjectsInit(self.s(c["s"]), t, n))}

    def op_find(self, c: dict[str, Any]) -> dict[str, Any]:
        s = self.s(c["s"])
        arr = (CK_ULONG * c["max"])()
        n = CK_ULONG()
        rv = int(self.m.C_FindObjects(s, arr, c["max"], C.byref(n)))
        if rv != OK:
            return {"rv": rv}
        return {"rv": rv, "found": [self.describe(s, h) for h in arr[: n.value]]}

    def op_find_final(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"rv": int(self.m.C_FindObjectsFinal(self.s(c["s"])))}

    def op_getattr(self, c: dict[str, Any]) -> dict[str, Any]:
        s, h = self.s(c["s"]), self.o(c["o"])
        names = c["a"]
        arr = (CK_ATTRIBUTE * len(names))()
        for i, name in enumerate(names):
            arr[i].type, arr[i].pValue, arr[i].ulValueLen = CKA[name], None, 0
        rv1 = int(self.m.C_GetAttributeValue(s, h, arr, len(names)))
        lens = [arr[i].ulValueLen for i in range(len(names))]
        if rv1 not in (OK, CKR["CKR_ATTRIBUTE_SENSITIVE"], CKR["CKR_ATTRIBUTE_TYPE_INVALID"]):
            return {"rv": rv1}
        keep = []
        for i, n in enumerate(lens):
            if n == C.c_ulong(-1).value:
                arr[i].pValue, arr[i].ulValueLen = None, 0
                continue
            buf = (C.c_ubyte * max(n, 1))()
            keep.append(buf)
            arr[i].pValue, arr[i].ulValueLen = C.cast(buf, C.c_void_p), n
        rv2 = int(self.m.C_GetAttributeValue(s, h, arr, len(names)))
        values = []
        for i in range(len(names)):
            n = arr[i].ulValueLen
            if arr[i].pValue is None or n == C.c_ulong(-1).value:
                values.append(None)
            else:
                values.append(C.string_at(arr[i].pValue, n).hex())
        return {"rv": rv1, "rv2": rv2, "lens": lens, "values": values}

    def op_setattr(self, c: dict[str, Any]) -> dict[str, Any]:
        t, n, _keep = self.template(c["t"])
        return {"rv": int(self.m.C_SetAttributeValue(self.s(c["s"]), self.o(c["o"]), t, n))}

    def op_create(self, c: dict[str, Any]) -> dict[str, Any]:
        t, n, _keep = self.template(c["t"])
        h = CK_ULONG()
        rv = int(self.m.C_CreateObject(self.s(c["s"]), t, n, C.byref(h)))
        return self.new_object(rv, c["o"], h)

    def op_copy(self, c: dict[str, Any]) -> dict[str, Any]:
        t, n, _keep = self.template(c["t"])
        h = CK_ULONG()
        rv = int(self.m.C_CopyObject(self.s(c["s"]), self.o(c["src"]), t, n, C.byref(h)))
        return self.new_object(rv, c["o"], h)

    def op_destroy(self, c: dict[str, Any]) -> dict[str, Any]:
        rv = int(self.m.C_DestroyObject(self.s(c["s"]), self.o(c["o"])))
        return {"rv": rv}

    def op_genkey(self, c: dict[str, Any]) -> dict[str, Any]:
        mech, _k1 = self.mechanism(c["mech"])
        t, n, _k2 = self.template(c["t"])
        h = CK_ULONG()
        rv = int(self.m.C_GenerateKey(self.s(c["s"]), C.byref(mech), t, n, C.byref(h)))
        return self.new_object(rv, c["o"], h)

    def op_genpair(self, c: dict[str, Any]) -> dict[str, Any]:
        mech, _k1 = self.mechanism(c["mech"])
        pt, pn, _k2 = self.template(c["pub_t"])
        vt, vn, _k3 = self.template(c["priv_t"])
        hp, hv = CK_ULONG(), CK_ULONG()
        rv = int(self.m.C_GenerateKeyPair(self.s(c["s"]), C.byref(mech), pt, pn, vt, vn,
                                          C.byref(hp), C.byref(hv)))
        if rv == OK:
            self.bind(c["pub"], hp.value)
            self.bind(c["priv"], hv.value)
        return {"rv": rv}

    def op_wrap(self, c: dict[str, Any]) -> dict[str, Any]:
        mech, _k = self.mechanism(c["mech"])
        return self.out(self.m.C_WrapKey, [self.s(c["s"]), C.byref(mech), self.o(c["wk"]),
                                           self.o(c["k"])], c.get("q", False))

    def op_unwrap(self, c: dict[str, Any]) -> dict[str, Any]:
        mech, _k1 = self.mechanism(c["mech"])
        t, n, _k2 = self.template(c["t"])
        data = bytes.fromhex(c["data"])
        h = CK_ULONG()
        rv = int(self.m.C_UnwrapKey(self.s(c["s"]), C.byref(mech), self.o(c["uk"]), data,
                                    len(data), t, n, C.byref(h)))
        return self.new_object(rv, c["o"], h)

    def op_derive(self, c: dict[str, Any]) -> dict[str, Any]:
        mech, _k1 = self.mechanism(c["mech"])
        t, n, _k2 = self.template(c["t"])
        h = CK_ULONG()
        rv = int(self.m.C_DeriveKey(self.s(c["s"]), C.byref(mech), self.o(c["base"]), t, n,
                                    C.byref(h)))
        return self.new_object(rv, c["o"], h)

    # operations: fn is Sign, Verify, Encrypt, Decrypt or Digest
    def op_opinit(self, c: dict[str, Any]) -> dict[str, Any]:
        mech, _k = self.mechanism(c["mech"])
        fn = getattr(self.m, f"C_{c['fn']}Init")
        if c["fn"] == "Digest":
            return {"rv": int(fn(self.s(c["s"]), C.byref(mech)))}
        return {"rv": int(fn(self.s(c["s"]), C.byref(mech), self.o(c["k"])))}

    def op_oneshot(self, c: dict[str, Any]) -> dict[str, Any]:
        s, data = self.s(c["s"]), bytes.fromhex(c["data"])
        fn = getattr(self.m, f"C_{c['fn']}")
        if c["fn"] == "Verify":
            sig = bytes.fromhex(c["sig"])
            return {"rv": int(fn(s, data, len(data), sig, len(sig)))}
        return self.out(fn, [s, data, len(data)], c.get("q", False))

    def op_update(self, c: dict[str, Any]) -> dict[str, Any]:
        s, data = self.s(c["s"]), bytes.fromhex(c["data"])
        fn = getattr(self.m, f"C_{c['fn']}Update")
        if c["fn"] in ("Sign", "Verify", "Digest"):
            return {"rv": int(fn(s, data, len(data)))}
        return self.out(fn, [s, data, len(data)], c.get("q", False))

    def op_final(self, c: dict[str, Any]) -> dict[str, Any]:
        s = self.s(c["s"])
        fn = getattr(self.m, f"C_{c['fn']}Final")
        if c["fn"] == "Verify":
            sig = bytes.fromhex(c["sig"])
            return {"rv": int(fn(s, sig, len(sig)))}
        return self.out(fn, [s], c.get("q", False))

    def op_digestkey(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"rv": int(self.m.C_DigestKey(self.s(c["s"]), self.o(c["k"])))}

    def op_random(self, c: dict[str, Any]) -> dict[str, Any]:
        n = c["n"]
        buf = (C.c_ubyte * max(n, 1))()
        rv = int(self.m.C_GenerateRandom(self.s(c["s"]), buf, n))
        return {"rv": rv, "len": n if rv == OK else 0}

    def op_seed(self, c: dict[str, Any]) -> dict[str, Any]:
        data = bytes.fromhex(c["data"])
        return {"rv": int(self.m.C_SeedRandom(self.s(c["s"]), data, len(data)))}

    def op_cleanup(self, c: dict[str, Any]) -> dict[str, Any]:
        """Destroys the objects the model made as token objects (label m-…) on every
        token this module shows: the members and the reference token alike."""
        destroyed = damaged = 0
        pin = c["pin"].encode()
        for slot in self.m.slots():
            h = CK_ULONG()
            flags = CKF["CKF_SERIAL_SESSION"] | CKF["CKF_RW_SESSION"]
            if self.m.C_OpenSession(slot, flags, None, None, C.byref(h)) != OK:
                continue
            s = h.value
            self.m.C_Login(s, 1, pin, len(pin))
            # every object (no template): a truncated object file has no CKA_TOKEN either
            self.m.C_FindObjectsInit(s, None, 0)
            arr = (CK_ULONG * 512)()
            cnt = CK_ULONG()
            self.m.C_FindObjects(s, arr, 512, C.byref(cnt))
            self.m.C_FindObjectsFinal(s)
            for obj in arr[: cnt.value]:
                a = (CK_ATTRIBUTE * 1)()
                buf = (C.c_ubyte * 64)()
                a[0].type, a[0].pValue, a[0].ulValueLen = CKA["CKA_LABEL"], C.cast(buf, C.c_void_p), 64
                rv = self.m.C_GetAttributeValue(s, obj, a, 1)
                # CKR_ATTRIBUTE_VALUE_INVALID for every attribute: SoftHSM2's object file
                # truncated (a helper killed while SoftHSM2 wrote it: a kill event, or p11p
                # ending a hung one, as it must); it would stay in every later search
                ours = rv == OK and bytes(buf[: a[0].ulValueLen]).startswith(b"m-")
                if (ours or rv == ATTRIBUTE_VALUE_INVALID) and \
                        self.m.C_DestroyObject(s, obj) == OK:
                    destroyed += 1
                    damaged += rv != OK
            self.m.C_CloseSession(s)
        return {"rv": OK, "destroyed": destroyed, "damaged": damaged}


def main() -> None:
    module, label = sys.argv[1:3]
    w = Worker(module, label)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        c = json.loads(line)
        if c.get("op") == "quit":
            break
        try:
            reply = w.do(c)
        except Exception:  # a bug of this harness, not a result: the driver stops on it
            reply = {"crash": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
