"""Runs the fuzzers for a bounded time each and says whether any found a crash (the
`make fuzz` target; see fuzz/build.mk):

- client:   libFuzzer + ASan/UBSan over the client library's reply decoding
            (client_reply_fuzzer, built by fuzz/build.mk);
- helper:   libFuzzer + ASan/UBSan over the helper's direct-path codec, requests in
            and replies out against a fake module (helper_request_fuzzer);
- decoder:  atheris over the frame decoder and the daemon's connection protocol;
- dispatch: atheris over the daemon's dispatch against a real SoftHSM2 token.

Seed corpora are made from the spec first (fuzz/seeds.py); what the fuzzers add stays
in build/fuzz/corpus/ for the next run. A crash leaves its input in
build/fuzz/crashes/ and makes this exit 1.

    python3 fuzz/run.py [--seconds 60] [--only client,decoder] [--build build/fuzz]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import seeds  # noqa: E402

FUZZERS = ("client", "helper", "decoder", "dispatch")
BINARIES = {"client": "client_reply_fuzzer", "helper": "helper_request_fuzzer"}


def command(name: str, build: Path) -> list[str]:
    if name in BINARIES:
        return [str(build / BINARIES[name])]
    return [sys.executable, str(HERE / f"fuzz_{name}.py")]


def run_one(name: str, build: Path, seconds: int) -> tuple[bool, int, float, str]:
    """(passed, executions, seconds, log path) of one fuzzer's run."""
    corpus = build / "corpus" / name
    crashes = build / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    log = build / f"{name}.log"
    timeout = 60 if name == "dispatch" else 10
    args = [*command(name, build), f"-max_total_time={seconds}", f"-timeout={timeout}",
            "-rss_limit_mb=4096", "-print_final_stats=1", "-max_len=4096",
            f"-artifact_prefix={crashes}/{name}-", str(corpus)]
    env = {**os.environ, "P11P_FUZZ_WORKDIR": str((build / f"work-{name}").resolve()),
           "ASAN_OPTIONS": "detect_leaks=1:allocator_may_return_null=1",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    start = time.monotonic()
    with open(log, "wb") as out:
        # a hard stop well past the fuzzer's own time limit
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT, timeout=seconds + 300, check=False)
    elapsed = time.monotonic() - start
    text = log.read_text(errors="replace")
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    runs = int(m[-1]) if m else 0
    if not m:
        m2 = re.findall(r"Done (\d+) runs", text)
        runs = int(m2[-1]) if m2 else 0
    return done.returncode == 0, runs, elapsed, str(log)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 60)))
    ap.add_argument("--only", default=",".join(FUZZERS))
    ap.add_argument("--build", type=Path, default=ROOT / "build" / "fuzz")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in FUZZERS:
            ap.error(f"unknown fuzzer {n!r}; known: {', '.join(FUZZERS)}")
    counts = seeds.write(args.build / "corpus")
    print(f"seeds: {counts}")
    failed = []
    for name in names:
        print(f"fuzz {name}: {args.seconds} s ...", flush=True)
        ok, runs, elapsed, log = run_one(name, args.build, args.seconds)
        print(f"fuzz {name}: {'ok' if ok else 'CRASH'}, {runs} executions in {elapsed:.0f} s"
              f" ({log})", flush=True)
        if not ok:
            failed.append(name)
            tail = Path(log).read_text(errors="replace").splitlines()[-40:]
            print("\n".join(f"  | {line}" for line in tail))
    if failed:
        print(f"fuzz: crashes found by {', '.join(failed)}; inputs in {args.build / 'crashes'}")
        return 1
    print("fuzz: no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main())
