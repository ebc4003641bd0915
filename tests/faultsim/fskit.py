"""Fault module test kit: applications (separate processes, since the module reads its
environment when loaded) that call p11p-faultsim.so through ctypes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kit import FAULTSIM_SO, ROOT, SOFTHSM_SO, SoftHSM

PRELUDE = f"""
import ctypes as C, os, sys, threading, time
sys.path.insert(0, {str(ROOT / "tests")!r})
from ckraw import Module, CK_ULONG, CKF, CKR, CKA
m = Module({str(FAULTSIM_SO)!r})
assert m.initialize() == 0
slot = m.slots()[0]
buf = (C.c_ubyte * 64)()
def rnd(h):
    return m.C_GenerateRandom(h, buf, 16)
"""


class FaultApp:
    """Runs application code against the module, with a rules file and a fault log."""

    def __init__(self, root: Path, hsm: SoftHSM) -> None:
        self.rules = root / "rules"
        self.log = root / "faults.log"
        self.env = {**os.environ, **hsm.env, "P11P_FAULTSIM_MODULE": str(SOFTHSM_SO),
                    "P11P_FAULTSIM_RULES": str(self.rules), "P11P_FAULTSIM_LOG": str(self.log)}

    def set_rules(self, text: str) -> None:
        tmp = self.rules.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.rules)

    def run(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def start(self, code: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env)

    def fired(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


