"""HA fixtures: SoftHSM2 tokens holding the same imported keys, each put behind
p11p-faultsim.so, grouped by a p11p daemon (hakit.py has the classes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hakit import HAGroup, ha_softhsm, make_keys, repair_token_files, token_files
from kit import SoftHSM


@pytest.fixture(scope="session")
def ha_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys") / "keys.json")


HA_LABELS = ("hsmA", "hsmB", "hsmC")


@pytest.fixture(scope="session")
def ha_tokens(tmp_path_factory: pytest.TempPathFactory, ha_keys: Path) -> SoftHSM:
    return ha_softhsm(tmp_path_factory.mktemp("ha-softhsm"), ha_keys, HA_LABELS)


@pytest.fixture(autouse=True)
def _whole_tokens(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the session's tokens (its daemons stopped by then): a
    token.object a helper killed mid-write left truncated is put back, so that the
    token is there for the next tests (hakit.repair_token_files)."""
    yield
    if "ha_tokens" in request.fixturenames:
        hsm = request.getfixturevalue("ha_tokens")
        repair_token_files(hsm, token_files(hsm, HA_LABELS))


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
