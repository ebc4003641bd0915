"""The helper's direct-path codec (helper/fast_codec.c, fast_template.c and the calls
generated into helper/gen/fast_calls.c) under AddressSanitizer and UndefinedBehaviorSanitizer, in
every `make test`: the harness of `make fuzz` (fuzz/helper_request_fuzzer.c, a fake
module that reads every input to its length and writes every output to its capacity)
built without libFuzzer, run over the seed corpus made from the specs and seeded
mutations of it. The extension the helper loads is built without sanitizers; this is
where its C meets them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from p11p.helper import build_cffi

ROOT = Path(__file__).resolve().parents[2]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer"]
CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-g", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread",
          "-I/usr/include/p11-kit-1", f"-I{ROOT / 'protocol'}", f"-I{ROOT / 'helper'}"]
# the harness and the codec the helper's extension is built from
SOURCES = [ROOT / "fuzz" / "helper_request_fuzzer.c", *build_cffi.CODEC_SOURCES]


def test_the_direct_path_codec_under_asan_and_ubsan(tmp_path: Path) -> None:
    exe = tmp_path / "helper_request_fuzzer"
    subprocess.run(["cc", *CFLAGS, *SANITIZE, "-DP11P_FUZZ_STANDALONE", "-o", str(exe),
                    *map(str, SOURCES), "-lmsgpackc"], check=True, capture_output=True, text=True)
    subprocess.run([sys.executable, str(ROOT / "fuzz" / "seeds.py"), str(tmp_path / "corpus")],
                   check=True, capture_output=True)
    seeds = sorted((tmp_path / "corpus" / "helper").iterdir())
    assert len(seeds) > 100
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    done = subprocess.run([str(exe), "300000", "13", *map(str, seeds)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "no finding" in done.stdout
    assert "runtime error" not in done.stderr and "Sanitizer" not in done.stderr, done.stderr[-4000:]
