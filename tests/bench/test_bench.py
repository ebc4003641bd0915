"""The benchmark works end to end: `bench/run.py --quick` writes results.json,
results.md and chart.png, and p11bench measures SoftHSM2 directly and through p11p
(one member, and two in balance) without a single error, the operations added for issue
13 included; short-lived pkcs11-tool runs work through p11p, and the helpers' PSS is
read. Speed is not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kit import SOFTHSM_SO, USER_PIN, SoftHSM

ROOT = Path(__file__).resolve().parent.parent.parent
# p11bench's operations added for issue 13, all in the quick run
NEW_OPS = {"session-info", "sha256-4x256", "aes-ecb-1k", "ecdsa-p256-verify", "open-close"}


@pytest.mark.timeout(180)
def test_quick_benchmark(tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "build/p11bench"], cwd=ROOT, check=True)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("results.json", "results.md", "chart.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["section_errors"] == {}, results["section_errors"]
    runs = results["matrix"]["runs"]
    for config in ("direct", "p11p", "p11p-balance"):
        mine = [run for run in runs if run["config"] == config]
        assert mine, f"no run for {config}"
        assert NEW_OPS <= {run["op"] for run in mine}, config
        for run in mine:
            assert run["ok"] and run["errors"] == 0 and run["ops"] > 0, run
    assert any(run["config"] == "p11-kit" and run.get("ops_per_s") is not None for run in runs)
    # aes-gcm-1k through p11p is compared with aes-ecb-1k through p11-kit (which refuses GCM)
    assert any(run["config"] == "p11-kit" and run["op"] == "aes-ecb-1k" and run["ok"]
               for run in runs)
    assert results["failover"]["run"]["ops"] > 0  # its errors are a target, judged in the table
    assert results["failover"]["threads"] == 8
    startup = results["startup"]
    for config in ("direct", "p11-kit", "p11p"):
        assert startup[config]["runs"] > 0 and startup[config]["failures"] == 0, startup[config]
    assert startup["p11p"]["cpu_ms_per_app"] is not None
    assert results["footprint"]["pss"]["helpers"] > 0, results["footprint"]["pss"]
    assert {t["status"] for t in results["targets"]} <= {"PASS", "FALLS SHORT", "NOT MEASURED"}
    groups = [t["group"] for t in results["targets"]]
    assert groups == sorted(groups, key=["issue 13", "earlier targets"].index), groups
    measured = {t["name"] for t in results["targets"]
                if t["group"] == "issue 13" and t["status"] != "NOT MEASURED"}
    for words in ("pkcs11-tool", "CPU per application", "PSS", "failover", "session-info"):
        assert any(words in name for name in measured), (words, measured)
    assert "| target |" in (tmp_path / "results.md").read_text()


def _ipc_floor(*args: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    r = subprocess.run([str(ROOT / "build" / "ipc-floor"), *args], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["mode"] for line in lines] == ["direct", "socket", "futex", "futex-pinned"]
    for line in lines:
        assert line["threads"] == 2 and line["ops_per_s"] > 0, line
        assert line["vs_direct"] == pytest.approx(line["ops_per_s"] / lines[0]["ops_per_s"],
                                                  rel=1e-2), line
    return lines


@pytest.mark.timeout(120)
def test_ipc_floor_measures_the_four_ways(tmp_path: Path) -> None:
    """bench/ipc/ipc_floor.c (bench/README.md, "The IPC floor") builds with the warnings
    as errors and measures each of its ways: work done in process, over a socketpair,
    over a futex in shared memory, the same with the pairs held on one CPU, each against
    the first; the work a busy loop, or the benchmark's ECDSA signature through SoftHSM2
    (the key p11bench --setup makes; without it, a clear error)."""
    subprocess.run(["make", "-s", "build/ipc-floor", "build/p11bench"], cwd=ROOT, check=True)
    assert all("work_us" in line for line in _ipc_floor("2", "20", "0.3"))
    bad = subprocess.run([str(ROOT / "build" / "ipc-floor"), "0"], capture_output=True,
                         text=True, timeout=10)
    assert bad.returncode == 2 and "usage" in bad.stderr
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("tokA")
    env = {**os.environ, **hsm.env}
    missing = subprocess.run([str(ROOT / "build" / "ipc-floor"), "2", "ecdsa", "0.3"],
                             capture_output=True, text=True, timeout=30, env=env)
    assert missing.returncode == 1 and "bench-ec" in missing.stderr, missing.stderr
    subprocess.run([str(ROOT / "build" / "p11bench"), "--module", str(SOFTHSM_SO), "--token",
                    "tokA", "--pin", USER_PIN, "--setup"], env=env, check=True,
                   capture_output=True, timeout=120)
    assert all(line["work"] == "ecdsa" for line in _ipc_floor("2", "ecdsa", "0.3", env=env))
