"""The helper's data plane (helper/fast.c, fast_conn.c and the codec) under
AddressSanitizer and UndefinedBehaviorSanitizer, in every `make test`: the data plane's
tests (PLANE_TESTS) run again in a pytest of their own with P11P_TEST_SANITIZED_HELPER=1,
so that every helper they start runs on the extension's sanitized twin (helper/ffi.py,
P11P_HELPER_SANITIZE; kit.sanitized_helper) with libasan preloaded: its connections'
threads, the mailbox, pairs, the socket's spill, revocation and the listener's hand-over
run there, against SoftHSM2. A helper whose stderr carries a sanitizer's report fails
the test that stops it (helperlink.HelperLink.check_sanitizers); one that dies of it
fails the calls on it. (tests/ha/test_direct_path.py runs a daemon's helpers on it too.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from kit import ROOT, sanitized_helper

HERE = Path(__file__).resolve().parent
PLANE_TESTS = ["test_helper_fast.py", "test_helper_mailbox.py", "test_helper_dataplane.py"]


def test_the_data_plane_s_tests_pass_on_the_sanitized_helper() -> None:
    twin = sanitized_helper()  # built here, once, rather than by the first helper
    assert "libasan" in Path(twin["LD_PRELOAD"]).name
    env = {**os.environ, "P11P_TEST_SANITIZED_HELPER": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(str(HERE / t) for t in PLANE_TESTS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    tail = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, tail
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed is not None and int(passed.group(1)) >= 80, tail
    assert not re.search(r"\d+ (skipped|deselected)", done.stdout), tail
