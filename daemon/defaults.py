"""The built-in default configuration: two SoftHSM2 tokens under the user's state
directory, holding the same demo key, grouped as one virtual token.

Made on first run (`p11p daemon` without a configuration, or `p11p init-default`) so
that a first try and `make demo` need no set-up. Demo PINs only: this configuration
is for trying p11p, never for keys that matter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
DEMO_PIN = "1234"
DEMO_SO_PIN = "5678"
TOKENS = ("p11p-demo-a", "p11p-demo-b")


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "p11p"


def create(root: Path, faultsim: str | None = None) -> Path:
    """Creates (once) the default configuration under `root`; returns the main file.

    With `faultsim`, each member's module is put behind p11p-faultsim.so with an empty
    rules file beside the configuration, so a failure can be rehearsed."""
    main = root / "p11p.toml"
    if main.exists():
        return main
    if not shutil.which("softhsm2-util") or not os.path.exists(SOFTHSM):
        raise SystemExit("p11p: the default configuration needs SoftHSM2 (apt-get install softhsm2)")
    root.mkdir(parents=True, exist_ok=True)
    tokens = root / "softhsm" / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = root / "softhsm" / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    private = ec.generate_private_key(ec.SECP256R1())
    key = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (root / "demo-key.pub.pem").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with tempfile.NamedTemporaryFile(suffix=".pem") as pem:
        pem.write(key)
        pem.flush()
        for label in TOKENS:
            subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                            "--pin", DEMO_PIN, "--so-pin", DEMO_SO_PIN], env=env, check=True,
                           capture_output=True)
            subprocess.run(["softhsm2-util", "--import", pem.name, "--token", label, "--label",
                            "demo-key", "--id", "01", "--pin", DEMO_PIN], env=env, check=True,
                           capture_output=True)
    del key, private
    (root / "tokens.d").mkdir(exist_ok=True)
    members = ""
    for label, name in zip(TOKENS, ("softhsm-a", "softhsm-b"), strict=True):
        if faultsim:
            rules = root / f"{name}.rules"
            rules.touch()
            module = faultsim
            extra = (f'P11P_FAULTSIM_MODULE = "{SOFTHSM}", P11P_FAULTSIM_RULES = "{rules}", ')
        else:
            module, extra = SOFTHSM, ""
        members += (f'\n[[member]]\nname = "{name}"\nmodule = "{module}"\ntoken = "{label}"\n'
                    f'env = {{ {extra}SOFTHSM2_CONF = "{conf}" }}\n')
    (root / "tokens.d" / "demo.toml").write_text(
        '# Two SoftHSM2 tokens with the same demo key, seen as one token.\n'
        'label = "p11p-demo"\npolicy = "failover"\nwrite_policy = "primary"\n'
        'call_timeout = 5\nhold_timeout = 5\n\n[recovery]\ninterval = 1\nattempts = 0\n' + members)
    main.write_text('[daemon]\nsocket = "run/p11p.sock"\ntokens_dir = "tokens.d"\n')
    return main
