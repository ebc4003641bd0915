"""The demo's application: signs in a loop through p11p-client.so with PyKCS11 and
verifies every signature with the demo key's public half, printing one line a second;
exits after SECONDS, non-zero if any call failed or any signature did not verify.
    python3 demo/sign_loop.py CLIENT_SO TOKEN_LABEL PIN SECONDS PUBLIC_KEY_PEM"""

import hashlib
import sys
import time

import PyKCS11 as P
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

module, label, pin, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
with open(sys.argv[5], "rb") as f:
    public = serialization.load_pem_public_key(f.read())
assert isinstance(public, ec.EllipticCurvePublicKey)
lib = P.PyKCS11Lib()
lib.load(module)
slot = next(s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == label)
session = lib.openSession(slot, P.CKF_SERIAL_SESSION)
session.login(pin)
key = session.findObjects([(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_LABEL, "demo-key")])[0]
ok = errors = 0
start = last = time.monotonic()
while time.monotonic() - start < seconds:
    data = f"demo {ok}".encode()
    try:
        digest = hashlib.sha256(data).digest()  # SoftHSM2 2.6 signs digests (CKM_ECDSA)
        sig = bytes(session.sign(key, digest, P.Mechanism(P.CKM_ECDSA)))
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        public.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        ok += 1
    except (P.PyKCS11Error, InvalidSignature) as exc:
        errors += 1
        print(f"  error: {exc}", flush=True)
    if time.monotonic() - last >= 1:
        last = time.monotonic()
        print(f"  [{last - start:4.1f}s] {ok} signatures, {errors} errors", flush=True)
print(f"signing loop done: {ok} signatures, {errors} errors", flush=True)
sys.exit(1 if errors else 0)
