"""HA fixtures: SoftHSM2 tokens holding the same imported keys, each put behind
p11p-faultsim.so, grouped by a p11p daemon (hakit.py has the classes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hakit import HERE, HAGroup
from kit import SOFTHSM_SO, USER_PIN, SoftHSM


@pytest.fixture(scope="session")
def ha_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(65537, 2048)

    def pem(k: Any) -> str:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()).decode()

    def pub(k: Any) -> str:
        return k.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    keys = {"ec_private": pem(ec_key), "ec_public": pub(ec_key), "rsa_private": pem(rsa_key),
            "rsa_public": pub(rsa_key), "aes": os.urandom(32).hex(), "kek": os.urandom(32).hex(),
            "secret": os.urandom(24).hex(), "find_values": [os.urandom(8).hex() for _ in range(6)]}
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(keys))
    return path


@pytest.fixture(scope="session")
def ha_tokens(tmp_path_factory: pytest.TempPathFactory, ha_keys: Path) -> SoftHSM:
    hsm = SoftHSM(tmp_path_factory.mktemp("ha-softhsm"))
    for label in ("hsmA", "hsmB", "hsmC"):
        hsm.init_token(label)
        subprocess.run([sys.executable, str(HERE / "import_keys.py"), str(SOFTHSM_SO), label,
                        USER_PIN, str(ha_keys)], env={**os.environ, **hsm.env}, check=True)
    return hsm


@pytest.fixture
def ha_factory(tmp_path: Path, ha_tokens: SoftHSM) -> Iterator[Any]:
    made: list[HAGroup] = []

    def make(policy: str, tokens: list[str], **kw: Any) -> HAGroup:
        g = HAGroup(tmp_path / f"g{len(made)}", ha_tokens, policy, tokens, **kw)
        made.append(g)
        g.daemon.start()
        return g

    yield make
    for g in made:
        g.daemon.stop()
