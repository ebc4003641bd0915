"""Fixtures for the fault module's tests: a SoftHSM2 token with p11p-faultsim.so in front."""

from __future__ import annotations

from pathlib import Path

import pytest
from fskit import FaultApp
from kit import FAULTSIM_SO, SoftHSM


@pytest.fixture(scope="module")
def fs_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    hsm = SoftHSM(tmp_path_factory.mktemp("fs-softhsm"))
    hsm.init_token("fsTok")
    return hsm


@pytest.fixture
def app(tmp_path: Path, fs_token: SoftHSM) -> FaultApp:
    assert FAULTSIM_SO.exists(), "make build first"
    return FaultApp(tmp_path, fs_token)
