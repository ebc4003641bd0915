"""The client's codec, in C, without a socket (tests/client/codec_test*.c): every
argument kind, nested templates, structured mechanism parameters, malformed replies and
a seeded fuzz loop; plain and under ASan/UBSan (leak detection on)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from clientbuild import SANITIZER_ENV, sanitizer_report
from clientfixtures import *  # noqa: F403  (the fixtures)


@pytest.mark.parametrize("variant", ["plain", "asan"])
def test_codec(codec_tests: dict[str, Path], variant: str) -> None:
    env = dict(SANITIZER_ENV, ASAN_OPTIONS="detect_leaks=1:exitcode=99")
    rounds = "50000" if variant == "asan" else "200000"
    done = subprocess.run([str(codec_tests[variant]), rounds], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not sanitizer_report(done.stderr), done.stderr
    assert " 0 failed" in done.stdout


def test_generated_files_are_current() -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(["python3", str(root / "client" / "gen.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
