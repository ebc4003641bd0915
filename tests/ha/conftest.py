"""HA fixtures: SoftHSM2 tokens holding the same imported keys, each put behind
p11p-faultsim.so, grouped by a p11p daemon (hakit.py has the classes)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hakit import HERE, HAGroup, make_keys
from kit import SOFTHSM_SO, USER_PIN, SoftHSM


@pytest.fixture(scope="session")
def ha_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys") / "keys.json")


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
