"""Runs build/p11bench, the C benchmark client, and reads the one JSON line it prints.

A `Target` says how to reach a token (module path, token label, environment); `measure`
runs one timed operation against it; `Holder` keeps sessions open in a separate process
for the footprint measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
P11BENCH = ROOT / "build" / "p11bench"
PIN = "1234"


@dataclass
class Target:
    """One way to reach a token: SoftHSM2 directly, through p11p, or through p11-kit."""

    name: str
    module: Path
    token: str
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def args(self) -> list[str]:
        return [str(P11BENCH), "--module", str(self.module), "--token", self.token, "--pin", PIN]


def parse(stdout: str, what: str) -> dict:
    """The JSON line of a p11bench run (the last line of its standard output)."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"p11bench printed no result for {what}: {stdout!r}")
    result: dict = json.loads(lines[-1])
    return result


def setup_keys(target: Target) -> dict:
    """Generates the benchmark keys on the token if they are missing."""
    r = subprocess.run(target.args() + ["--setup"], env=target.environ(), capture_output=True,
                       text=True, timeout=300)
    result = parse(r.stdout, f"--setup on {target.name}")
    if not result.get("ok"):
        raise RuntimeError(f"key setup failed on {target.name}: {result}")
    return result


def measure(target: Target, op: str, threads: int, seconds: float, warmup: float,
            timeline: bool = False) -> dict:
    """One timed run; the result carries the target's name as `config`."""
    args = target.args() + ["--op", op, "--threads", str(threads), "--seconds", str(seconds),
                            "--warmup", str(warmup)]
    if timeline:
        args.append("--timeline")
    try:
        r = subprocess.run(args, env=target.environ(), capture_output=True, text=True,
                           timeout=seconds + warmup + 120)
        result = parse(r.stdout, f"{op} on {target.name}")
    except (subprocess.TimeoutExpired, RuntimeError) as exc:
        result = {"op": op, "threads": threads, "ok": False, "error": str(exc), "errors": None}
    result["config"] = target.name
    return result


class Holder:
    """A p11bench process that holds `sessions` open sessions until it is released."""

    def __init__(self, target: Target, sessions: int) -> None:
        self.proc = subprocess.Popen(target.args() + ["--hold", str(sessions)],
                                     env=target.environ(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            self.result = parse(line, "--hold")
        except RuntimeError:
            self.release()
            raise
        if not self.result.get("ok"):
            self.release()
            raise RuntimeError(f"holding {sessions} sessions failed: {self.result}")

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
