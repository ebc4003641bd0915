"""HA fixtures: SoftHSM2 tokens holding the same imported keys, each put behind
p11p-faultsim.so, grouped by a p11p daemon (hakit.py has the classes)."""

from __future__ import annotations

import warnings
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


@pytest.fixture(scope="session")
def ha_token_files(ha_tokens: SoftHSM) -> dict[str, Path]:
    """Each session token's token.object, found while they are all whole."""
    files = token_files(ha_tokens, HA_LABELS)
    assert sorted(files) == sorted(HA_LABELS), files
    return files


@pytest.fixture(autouse=True)
def _whole_tokens(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the session's tokens (its daemons stopped by then): a
    token.object a helper killed mid-write left truncated is put back, so that the
    token is there for the next tests (hakit.repair_token_files)."""
    if "ha_tokens" not in request.fixturenames:
        yield
        return
    files = request.getfixturevalue("ha_token_files")  # the first time: before any test ran
    yield
    repaired = repair_token_files(request.getfixturevalue("ha_tokens"), files)
    if repaired:  # in the run's warnings summary, a passing test's or not
        warnings.warn(f"{request.node.nodeid}: token.object of {repaired} damaged; put back",
                      stacklevel=1)


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
