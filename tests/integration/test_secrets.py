"""PINs never leave memory: at the most verbose log level, a login, a wrong PIN and a
C_SetPIN leave no PIN (old, new or wrong) in any log line, in `p11p status` (plain,
--json, --prometheus), or in any file p11p wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kit import CLIENT_SO, Daemon, SoftHSM, one_member_group

OLD, NEW, WRONG = "Pin-Old-4471x", "Pin-New-7315y", "Pin-Bad-9923z"


def test_no_pin_in_logs_status_or_files(tmp_path: Path) -> None:
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("secretTok", pin=OLD)
    d = Daemon(tmp_path / "p11p", {"s": one_member_group("secrets", hsm, "secretTok")})
    d.start(log_level="debug")
    try:
        code = textwrap.dedent(f"""
            import PyKCS11 as P
            lib = P.PyKCS11Lib(); lib.load({str(CLIENT_SO)!r})
            slot = lib.getSlotList(tokenPresent=True)[0]
            s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
            try:
                s.login({WRONG!r})
            except P.PyKCS11Error as e:
                print("wrong", e.value == P.CKR_PIN_INCORRECT)
            s.login({OLD!r})
            s.setPin({OLD!r}, {NEW!r})
            s.logout()
            s.login({NEW!r})
            print("new pin works", s.getSessionInfo().state == P.CKS_RW_USER_FUNCTIONS)
            """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, **d.env}, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["wrong", "True", "new", "pin", "works", "True"]
        outputs = []
        for extra in ([], ["--json"], ["--prometheus"]):
            s = subprocess.run([sys.executable, "-m", "p11p.daemon", "status", "--config",
                                str(d.config), *extra], capture_output=True, text=True)
            assert s.returncode == 0, s.stderr
            outputs.append(s.stdout + s.stderr)
    finally:
        d.stop()
    log = d.log_text()
    assert " DEBUG " in log  # the most verbose level really was on
    written = [p for p in d.root.rglob("*") if p.is_file()]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "p11p"
    written += [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    for pin in (OLD, NEW, WRONG):
        assert pin not in log
        assert all(pin not in out for out in outputs)
        for path in written:
            assert pin.encode() not in path.read_bytes(), path
