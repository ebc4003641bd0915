"""The suite's own repair of SoftHSM2 token files (hakit.repair_token_files): a helper
killed while SoftHSM2 rewrites its token.object in place leaves it truncated, and the
token is gone for every later test that shares it; the file is put back as it was made."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from hakit import ha_softhsm, repair_token_files, token_files
from kit import SOFTHSM_SO


def _labels(env: dict[str, str]) -> str:
    return subprocess.run(["pkcs11-tool", "--module", str(SOFTHSM_SO), "-L"],
                          env={**os.environ, **env}, capture_output=True, text=True).stdout


def test_a_truncated_token_object_is_put_back(tmp_path: Path, ha_keys: Path) -> None:
    hsm = ha_softhsm(tmp_path / "softhsm", ha_keys, ("hsmA",))
    files = token_files(hsm, ("hsmA",))
    whole = files["hsmA"].read_bytes()
    assert "hsmA" in _labels(hsm.env)
    files["hsmA"].write_bytes(whole[:40])
    assert "hsmA" not in _labels(hsm.env)
    assert repair_token_files(hsm, files) == ["hsmA"]
    assert files["hsmA"].read_bytes() == whole
    assert "hsmA" in _labels(hsm.env)
    assert repair_token_files(hsm, files) == []
