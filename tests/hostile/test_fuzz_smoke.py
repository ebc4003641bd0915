"""A few seconds of each fuzzer of `make fuzz` (fuzz/), so that a harness that no longer
builds or runs is seen in `make test`. Skipped when the tools are not there: clang
with libFuzzer for the C harnesses (`make fuzz` installs it), atheris for the Python ones
(a test dependency since the decoder's harness broke unseen: `make test` installs it)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kit import ROOT

FUZZ = ROOT / "fuzz"
ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "halt_on_error=1"}


def _seeds(tmp: Path) -> Path:
    subprocess.run([sys.executable, str(FUZZ / "seeds.py"), str(tmp / "corpus")], check=True,
                   capture_output=True)
    return tmp / "corpus"


def assert_ran(out: str, runs: int) -> None:
    """libFuzzer ran to its end: "Done N runs", N at least what -runs= asked (it checks
    the count between batches of mutations, so it may run a few more)."""
    done = re.search(r"^Done (\d+) runs", out, re.M)
    assert done is not None and int(done.group(1)) >= runs, out[-3000:]


def _run(cmd: list[str], tmp: Path, timeout: float) -> str:
    done = subprocess.run([*cmd, f"-artifact_prefix={tmp}/"], capture_output=True, text=True,
                          env={**ENV, "P11P_FUZZ_WORKDIR": str(tmp / "work")}, cwd=ROOT,
                          timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return out


def fuzz_sources(name: str) -> list[str]:
    """The sources `make fuzz` links into a fuzzer (fuzz/build.mk's FUZZ_CLIENT_SRCS,
    FUZZ_HELPER_SRCS): one list for both."""
    text = (FUZZ / "build.mk").read_text().replace("\\\n", " ")
    found = re.search(rf"^{name}\s*:=\s*(.+)$", text, re.M)
    assert found is not None, f"{name} not in fuzz/build.mk"
    return found.group(1).split()


def test_the_helper_fuzzer_links_the_codec_the_helper_compiles() -> None:
    """FUZZ_HELPER_SRCS is the codec the helper's extension is built from
    (helper/build_cffi.py CODEC_SOURCES), so that the fuzzer sees all of it."""
    from p11p.helper import build_cffi

    codec = [str(Path(p).resolve().relative_to(ROOT)) for p in build_cffi.CODEC_SOURCES]
    assert fuzz_sources("FUZZ_HELPER_SRCS") == codec


def test_client_reply_fuzzer_smoke(tmp_path: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("no clang here (make fuzz installs it)")
    calls = tmp_path / "client_calls.c"
    subprocess.run([sys.executable, str(FUZZ / "gen_client_calls.py"), str(calls)], check=True)
    exe = tmp_path / "client_reply_fuzzer"
    sources = fuzz_sources("FUZZ_CLIENT_SRCS")
    build = subprocess.run(
        [clang, "-std=c11", "-D_GNU_SOURCE", "-g", "-O1", "-pthread", "-I/usr/include/p11-kit-1",
         "-Iprotocol", "-Iclient", "-Ifuzz", "-fsanitize=fuzzer,address,undefined",
         "-fno-sanitize-recover=undefined", "-o", str(exe), "fuzz/client_reply_fuzzer.c",
         str(calls), *sources, "-lmsgpackc"], cwd=ROOT, capture_output=True, text=True)
    if build.returncode != 0 and "libclang_rt.fuzzer" in build.stderr:
        pytest.skip("clang without libFuzzer here (make fuzz installs it)")
    assert build.returncode == 0, build.stderr[-3000:]
    corpus = _seeds(tmp_path)
    out = _run([str(exe), "-runs=30000", "-max_len=4096", str(corpus / "client")], tmp_path, 120)
    assert_ran(out, 30000)


def test_helper_request_fuzzer_smoke(tmp_path: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("no clang here (make fuzz installs it)")
    exe = tmp_path / "helper_request_fuzzer"
    build = subprocess.run(
        [clang, "-std=c11", "-D_GNU_SOURCE", "-g", "-O1", "-Wall", "-Wextra", "-Werror",
         "-pthread", "-I/usr/include/p11-kit-1", "-Iprotocol", "-Ihelper",
         "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined", "-o", str(exe),
         "fuzz/helper_request_fuzzer.c", *fuzz_sources("FUZZ_HELPER_SRCS"), "-lmsgpackc"],
        cwd=ROOT, capture_output=True, text=True)
    if build.returncode != 0 and "libclang_rt.fuzzer" in build.stderr:
        pytest.skip("clang without libFuzzer here (make fuzz installs it)")
    assert build.returncode == 0, build.stderr[-3000:]
    corpus = _seeds(tmp_path)
    out = _run([str(exe), "-runs=30000", "-max_len=4096", str(corpus / "helper")], tmp_path, 120)
    assert_ran(out, 30000)


@pytest.mark.parametrize("target,runs", [("decoder", 3000), ("dispatch", 400)])
def test_python_fuzzer_smoke(tmp_path: Path, target: str, runs: int) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed here (make test installs it)")
    corpus = _seeds(tmp_path)
    out = _run([sys.executable, str(FUZZ / f"fuzz_{target}.py"), f"-runs={runs}",
                str(corpus / target)], tmp_path, 180)
    assert_ran(out, runs)
