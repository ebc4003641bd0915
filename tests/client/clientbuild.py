"""Builds what the client tests run: the client library (plain and ASan/UBSan, through
the top Makefile), the codec test and the driver (plain and sanitized, straight with
the C compiler), and runs the driver as a scripted application."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLIENT = ROOT / "client"
LIBS = {"plain": ROOT / "build" / "p11p-client.so", "asan": ROOT / "build" / "asan" / "p11p-client.so"}
CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-pthread", "-g", "-O1",
          "-I/usr/include/p11-kit-1", f"-I{ROOT / 'protocol'}", f"-I{CLIENT}", f"-I{HERE}"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:exitcode=99",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=98",
}
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")
# The codec test links the codec and the stubs with a fake link instead of the socket.
CODEC_SOURCES = [CLIENT / n for n in ("codec.c", "codec_info.c", "codec_template.c",
                                      "codec_mech.c", "call.c", "gen/stubs.c",
                                      "gen/mech_params.c")]
CODEC_TEST_SOURCES = [HERE / n for n in ("fake_link.c", "mptext.c", "codec_test.c",
                                         "codec_test_params.c", "codec_test_malformed.c")]
# The transport test links transport.c with what it needs of the library.
TRANSPORT_TEST_SOURCES = [HERE / "transport_test.c", *(CLIENT / n for n in (
    "transport.c", "debug.c", "codec.c"))]


def make_libraries() -> dict[str, Path]:
    subprocess.run(["make", "-s", *(str(p.relative_to(ROOT)) for p in LIBS.values())],
                   cwd=ROOT, check=True)
    return LIBS


def compile_c(out: Path, sources: list[Path], sanitize: bool, libs: list[str]) -> Path:
    cmd = ["cc", *CFLAGS, *(SANITIZE if sanitize else []), "-o", str(out),
           *map(str, sources), *libs]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{done.stderr}")
    return out


def sanitizer_report(text: str) -> bool:
    return any(mark in text for mark in SANITIZER_MARKS)


class Result(dict[str, str]):
    """One result line of the driver, key=value pairs; child lines of a fork in .child."""

    child: list[Result]

    @property
    def rv(self) -> int:
        return int(self["rv"], 16)

    def num(self, key: str) -> float:
        return float(self[key])


def parse(line: str) -> Result:
    r = Result(tok.split("=", 1) for tok in line.split() if "=" in tok)
    r.child = []
    return r


class Driver:
    """tests/client/driver.c running against one build of the library."""

    def __init__(self, exe: Path, lib: Path, sanitized: bool, env: dict[str, str]) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith("P11P_")}
        if sanitized:
            full.update(SANITIZER_ENV)
        full.update(env)
        self.proc = subprocess.Popen([str(exe), str(lib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, errors="replace", env=full, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()
        ready = self._line(15)
        assert ready.startswith("ready"), ready
        self.pid = int(parse(ready)["pid"])

    @staticmethod
    def _pump(stream, put) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def _line(self, timeout: float) -> str:
        line = self._lines.get(timeout=timeout)
        if line is None:
            raise AssertionError("driver exited: " + "\n".join(x for x in self.stderr if x))
        return line

    def cmd(self, text: str, timeout: float = 15) -> Result:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        child: list[Result] = []
        while True:
            line = self._line(timeout)
            if line.startswith("child "):
                child.append(parse(line[len("child "):]))
                continue
            result = parse(line)
            result.child = child
            return result

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        err = "\n".join(line for line in self.stderr if line is not None)
        assert not sanitizer_report(err), err
        assert self.proc.returncode == 0, f"driver exit {self.proc.returncode}: {err}"
