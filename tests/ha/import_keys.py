"""Imports the HA test keys (keys.json) into one SoftHSM2 token with C_CreateObject, the
way an operator replicates keys between HSMs. Run with SOFTHSM2_CONF set:
    python3 import_keys.py MODULE TOKEN_LABEL PIN keys.json"""

from __future__ import annotations

import json
import sys

import PyKCS11 as P
from cryptography.hazmat.primitives import serialization


def main() -> None:
    module, label, pin, keys_file = sys.argv[1:5]
    keys = json.load(open(keys_file))
    lib = P.PyKCS11Lib()
    lib.load(module)
    slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == label)
    s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
    s.login(pin)
    common = [(P.CKA_TOKEN, True), (P.CKA_PRIVATE, True)]
    ec_key = serialization.load_pem_private_key(keys["ec_private"].encode(), None)
    s.createObject(common + [
        (P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_EC), (P.CKA_LABEL, "ha-ec"),
        (P.CKA_ID, b"\x01"), (P.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")),
        (P.CKA_VALUE, ec_key.private_numbers().private_value.to_bytes(32, "big")),  # type: ignore[union-attr]
        (P.CKA_SIGN, True), (P.CKA_SENSITIVE, True)])
    rsa_key = serialization.load_pem_private_key(keys["rsa_private"].encode(), None)
    n = rsa_key.private_numbers()  # type: ignore[union-attr]

    def b(x: int) -> bytes:
        return x.to_bytes((x.bit_length() + 7) // 8, "big")

    s.createObject(common + [
        (P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_KEY_TYPE, P.CKK_RSA), (P.CKA_LABEL, "ha-rsa"),
        (P.CKA_ID, b"\x02"), (P.CKA_MODULUS, b(n.public_numbers.n)),
        (P.CKA_PUBLIC_EXPONENT, b(n.public_numbers.e)), (P.CKA_PRIVATE_EXPONENT, b(n.d)),
        (P.CKA_PRIME_1, b(n.p)), (P.CKA_PRIME_2, b(n.q)), (P.CKA_EXPONENT_1, b(n.dmp1)),
        (P.CKA_EXPONENT_2, b(n.dmq1)), (P.CKA_COEFFICIENT, b(n.iqmp)), (P.CKA_SIGN, True),
        (P.CKA_SENSITIVE, True)])
    for name, cid, extra in (("aes", b"\x03", [(P.CKA_ENCRYPT, True), (P.CKA_DECRYPT, True)]),
                             ("kek", b"\x04", [(P.CKA_WRAP, True), (P.CKA_UNWRAP, True)])):
        s.createObject(common + extra + [
            (P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES),
            (P.CKA_LABEL, f"ha-{name}"), (P.CKA_ID, cid), (P.CKA_VALUE, bytes.fromhex(keys[name])),
            (P.CKA_SENSITIVE, True)])
    s.createObject(common + [(P.CKA_CLASS, P.CKO_DATA), (P.CKA_LABEL, "ha-secret"),
                             (P.CKA_VALUE, bytes.fromhex(keys["secret"]))])
    for i, value in enumerate(keys["find_values"]):
        s.createObject([(P.CKA_TOKEN, True), (P.CKA_PRIVATE, False), (P.CKA_CLASS, P.CKO_DATA),
                        (P.CKA_LABEL, "ha-find"), (P.CKA_APPLICATION, f"find-{i}"),
                        (P.CKA_VALUE, bytes.fromhex(value))])
    s.logout()
    s.closeSession()


if __name__ == "__main__":
    main()
