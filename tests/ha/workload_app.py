"""A real application for the HA tests: runs workloads through p11p-client.so in two
phases, so that the test can break a member between them. Driven over stdin/stdout:

    begin WORKLOAD   -> runs phase 1, answers "ready"
    finish           -> runs phase 2, verifies every output, answers "ok ..." or "error ..."
    quit

Keys come from keys.json (made by the test and imported into every member), so every
signature, ciphertext and value is checked with the `cryptography` library.
"""

from __future__ import annotations

import ctypes as C
import json
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ckraw import CK_ATTRIBUTE, CK_ULONG, CKA, CKM, Module, mechanism, template  # noqa: E402
from cryptography.hazmat.primitives import hashes, padding, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding as apad  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import (  # noqa: E402
    Prehashed,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding  # noqa: E402


class Failed(Exception):
    pass


def check(rv: int, what: str) -> None:
    if rv != 0:
        raise Failed(f"{what} returned {rv:#x}")


class App:
    def __init__(self, module: str, label: str, pin: str, keys: dict[str, Any]) -> None:
        self.m = Module(module)
        check(self.m.initialize(), "C_Initialize")
        self.slot = next(s for s in self.m.slots() if self._label(s) == label.encode())
        self.base = self.m.open_session(self.slot)  # keeps the application logged in
        check(self.m.login(self.base, pin.encode()), "C_Login")
        self.h = self.base
        self.keys = keys
        self.state: dict[str, Any] = {}

    def _label(self, slot: int) -> bytes:
        info = (C.c_ubyte * 512)()
        check(self.m.C_GetTokenInfo(slot, info), "C_GetTokenInfo")
        return bytes(info[:32]).rstrip()

    def find(self, label: str, cls: int) -> int:
        t, n, keep = template((CKA["CKA_LABEL"], label.encode()), (CKA["CKA_CLASS"], cls))
        check(self.m.C_FindObjectsInit(self.h, t, n), "C_FindObjectsInit")
        out = (CK_ULONG * 4)()
        count = CK_ULONG()
        check(self.m.C_FindObjects(self.h, out, 4, C.byref(count)), "C_FindObjects")
        check(self.m.C_FindObjectsFinal(self.h), "C_FindObjectsFinal")
        if count.value != 1:
            raise Failed(f"{count.value} objects labelled {label}")
        return int(out[0])

    def out_call(self, fn: Any, *args: Any, cap: int = 1024) -> bytes:
        buf = (C.c_ubyte * cap)()
        n = CK_ULONG(cap)
        check(fn(*args, buf, C.byref(n)), fn.__name__ if hasattr(fn, "__name__") else "call")
        return bytes(buf[: n.value])

    # -- workloads: begin_X is phase 1, finish_X is phase 2 ----------------------------

    def begin_ecdsa(self) -> None:
        key = self.find("ha-ec", 3)
        mech, _ = mechanism(CKM["CKM_ECDSA"])
        check(self.m.C_SignInit(self.h, C.byref(mech), key), "C_SignInit")

    def finish_ecdsa(self) -> str:
        digest = os.urandom(32)
        sig = self.out_call(self.m.C_Sign, self.h, digest, 32)
        pub = serialization.load_pem_public_key(self.keys["ec_public"].encode())
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
                   digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        return "signature verifies"

    def begin_rsa_multipart(self) -> None:
        key = self.find("ha-rsa", 3)
        mech, _ = mechanism(CKM["CKM_SHA256_RSA_PKCS"])
        check(self.m.C_SignInit(self.h, C.byref(mech), key), "C_SignInit")
        self.state["parts"] = [os.urandom(100) for _ in range(5)]
        for part in self.state["parts"][:2]:
            check(self.m.C_SignUpdate(self.h, part, len(part)), "C_SignUpdate")

    def finish_rsa_multipart(self) -> str:
        parts = self.state["parts"]
        for part in parts[2:]:
            check(self.m.C_SignUpdate(self.h, part, len(part)), "C_SignUpdate")
        sig = self.out_call(self.m.C_SignFinal, self.h)
        pub = serialization.load_pem_public_key(self.keys["rsa_public"].encode())
        pub.verify(sig, b"".join(parts), apad.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr, call-arg]
        return "signature verifies"

    def begin_aes_cbc(self) -> None:
        key = self.find("ha-aes", 4)
        iv = os.urandom(16)
        mech, keep = mechanism(CKM["CKM_AES_CBC_PAD"], iv)
        check(self.m.C_EncryptInit(self.h, C.byref(mech), key), "C_EncryptInit")
        parts = [os.urandom(n) for n in (40, 17, 100, 3)]
        out = b""
        for part in parts[:2]:
            out += self.out_call(self.m.C_EncryptUpdate, self.h, part, len(part))
        self.state.update(iv=iv, parts=parts, out=out)

    def finish_aes_cbc(self) -> str:
        out = self.state["out"]
        for part in self.state["parts"][2:]:
            out += self.out_call(self.m.C_EncryptUpdate, self.h, part, len(part))
        out += self.out_call(self.m.C_EncryptFinal, self.h)
        dec = Cipher(algorithms.AES(bytes.fromhex(self.keys["aes"])), modes.CBC(self.state["iv"])).decryptor()
        unpad = padding.PKCS7(128).unpadder()
        plain = unpad.update(dec.update(out) + dec.finalize()) + unpad.finalize()
        if plain != b"".join(self.state["parts"]):
            raise Failed("ciphertext does not decrypt to the input")
        return "ciphertext decrypts"

    def begin_find(self) -> None:
        t, n, keep = template((CKA["CKA_LABEL"], b"ha-find"))
        check(self.m.C_FindObjectsInit(self.h, t, n), "C_FindObjectsInit")
        self.state["found"] = self._find_batch(2)

    def _find_batch(self, k: int) -> list[int]:
        out = (CK_ULONG * k)()
        count = CK_ULONG()
        check(self.m.C_FindObjects(self.h, out, k, C.byref(count)), "C_FindObjects")
        return list(out[: count.value])

    def finish_find(self) -> str:
        found = self.state["found"]
        while True:
            batch = self._find_batch(2)
            if not batch:
                break
            found += batch
        check(self.m.C_FindObjectsFinal(self.h), "C_FindObjectsFinal")
        values = sorted(self.read(h, CKA["CKA_VALUE"]) for h in found)
        expected = sorted(bytes.fromhex(v) for v in self.keys["find_values"])
        if values != expected:
            raise Failed(f"find returned {len(found)} objects, values differ: {values} != {expected}")
        return f"{len(found)} objects, each once"

    def read(self, handle: int, attr: int) -> bytes:
        a = (CK_ATTRIBUTE * 1)()
        buf = (C.c_ubyte * 256)()
        a[0].type, a[0].pValue, a[0].ulValueLen = attr, C.cast(buf, C.c_void_p), 256
        check(self.m.C_GetAttributeValue(self.h, handle, a, 1), "C_GetAttributeValue")
        return bytes(buf[: a[0].ulValueLen])

    def _encrypt_check(self, key: int, raw_key: bytes) -> str:
        iv = os.urandom(16)
        mech, keep = mechanism(CKM["CKM_AES_CBC_PAD"], iv)
        check(self.m.C_EncryptInit(self.h, C.byref(mech), key), "C_EncryptInit")
        data = os.urandom(50)
        ct = self.out_call(self.m.C_Encrypt, self.h, data, len(data))
        dec = Cipher(algorithms.AES(raw_key), modes.CBC(iv)).decryptor()
        unpad = padding.PKCS7(128).unpadder()
        if unpad.update(dec.update(ct) + dec.finalize()) + unpad.finalize() != data:
            raise Failed("session key does not encrypt as expected")
        return "session key works"

    def begin_created_key(self) -> None:
        raw = os.urandom(32)
        t, n, keep = template((CKA["CKA_CLASS"], 4), (CKA["CKA_KEY_TYPE"], 0x1f),
                              (CKA["CKA_TOKEN"], False), (CKA["CKA_ENCRYPT"], True),
                              (CKA["CKA_VALUE"], raw))
        h = CK_ULONG()
        check(self.m.C_CreateObject(self.h, t, n, C.byref(h)), "C_CreateObject")
        self.state.update(key=h.value, raw=raw)

    def finish_created_key(self) -> str:
        return self._encrypt_check(self.state["key"], self.state["raw"])

    def begin_unwrapped_key(self) -> None:
        kek = self.find("ha-kek", 4)
        raw = os.urandom(32)
        wrapped = aes_key_wrap_with_padding(bytes.fromhex(self.keys["kek"]), raw)
        t, n, keep = template((CKA["CKA_CLASS"], 4), (CKA["CKA_KEY_TYPE"], 0x1f),
                              (CKA["CKA_TOKEN"], False), (CKA["CKA_ENCRYPT"], True))
        mech, _ = mechanism(CKM["CKM_AES_KEY_WRAP_PAD"])
        h = CK_ULONG()
        check(self.m.C_UnwrapKey(self.h, C.byref(mech), kek, wrapped, len(wrapped), t, n,
                                 C.byref(h)), "C_UnwrapKey")
        self.state.update(key=h.value, raw=raw)

    def finish_unwrapped_key(self) -> str:
        return self._encrypt_check(self.state["key"], self.state["raw"])

    def begin_private_attribute(self) -> None:
        self.state["obj"] = self.find("ha-secret", 0)  # CKO_DATA, CKA_PRIVATE

    def finish_private_attribute(self) -> str:
        value = self.read(self.state["obj"], CKA["CKA_VALUE"])
        if value != bytes.fromhex(self.keys["secret"]):
            raise Failed("private value differs")
        return "private value read"


def main() -> None:
    module, label, pin, keys_file = sys.argv[1:5]
    app = App(module, label, pin, json.load(open(keys_file)))
    print("started", flush=True)
    workload = ""
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "begin":
                workload = arg
                app.state = {}
                app.h = app.m.open_session(app.slot)  # a session per workload
                getattr(app, f"begin_{workload}")()
                print("ready", flush=True)
            elif cmd == "finish":
                result = getattr(app, f"finish_{workload}")()
                check(app.m.C_CloseSession(app.h), "C_CloseSession")
                print("ok", result, flush=True)
            elif cmd == "quit":
                break
        except Exception as exc:  # report, go on with the next workload
            traceback.print_exc()
            print("error", f"{type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
    app.m.C_Finalize(None)


if __name__ == "__main__":
    main()
