"""A member selected by PKCS#11 URI (RFC 7512) instead of a label."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from kit import CLIENT_SO, SOFTHSM_SO, Daemon, SoftHSM


def _member(hsm: SoftHSM, uri: str) -> str:
    return f"""
        label = "by-uri"
        [[member]]
        name = "m"
        module = "{SOFTHSM_SO}"
        uri = "{uri}"
        env = {{ SOFTHSM2_CONF = "{hsm.conf}" }}
        """


def test_member_by_uri(softhsm: SoftHSM, tmp_path: Path) -> None:
    listing = subprocess.run(["pkcs11-tool", "--module", str(SOFTHSM_SO), "-L"], capture_output=True,
                             text=True, env={**os.environ, **softhsm.env}).stdout
    serial = re.search(r"token label\s*:\s*tokB\n(?:.*\n)*?\s*serial num\s*:\s*(\w+)", listing)
    assert serial, listing
    d = Daemon(tmp_path / "ok", {"u": _member(softhsm, f"pkcs11:model=SoftHSM%20v2;serial={serial.group(1)}")})
    d.start()
    try:
        r = subprocess.run(["pkcs11-tool", "--module", str(CLIENT_SO), "--token-label", "by-uri",
                            "--generate-random", "16"], capture_output=True, env={**os.environ, **d.env})
        assert r.returncode == 0 and len(r.stdout) == 16, r.stderr
        assert "member ready: group=by-uri member=m" in d.log_text()
    finally:
        d.stop()
    d = Daemon(tmp_path / "none", {"u": _member(softhsm, "pkcs11:token=nosuch;model=SoftHSM%20v2")})
    d.start()
    try:
        assert "no token with label='nosuch', model='SoftHSM v2'" in d.log_text()
    finally:
        d.stop()
