"""What a helper costs, with the fork server and without (`[daemon] fork_server`):

- start: HelperProcess.start to its ready frame, median of `--starts` (SoftHSM2);
- CPU: daemon and helper CPU per short-lived application (`pkcs11-tool -O`, `--runs`
  of them; the daemon's own CPU and its reaped descendants', less an idle run's);
- PSS: the helpers' average PSS (/proc/PID/smaps_rollup) with `--apps` applications
  open on a two-member group.

`bench/run.py` (its startup and footprint sections) measures with these same functions.
The daemons log at info, as the benchmark's do.

    python3 bench/helper_costs.py [--starts 20] [--runs 50] [--apps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from kit import CLIENT_SO, SOFTHSM_SO, Daemon, SoftHSM, helper_pids  # noqa: E402
from p11p.daemon import forkserver  # noqa: E402
from p11p.daemon.helperproc import HelperProcess  # noqa: E402

APP = f"""
import ctypes, sys
lib = ctypes.CDLL({str(CLIENT_SO)!r})
f = ctypes.c_void_p()
lib.C_GetFunctionList(ctypes.byref(f))
assert lib.C_Initialize(None) == 0
n = ctypes.c_ulong(8); slots = (ctypes.c_ulong * 8)()
assert lib.C_GetSlotList(1, slots, ctypes.byref(n)) == 0
h = ctypes.c_ulong()
assert lib.C_OpenSession(slots[0], 4, None, None, ctypes.byref(h)) == 0
print("ready", flush=True)
sys.stdin.read()
"""


async def starts(hsm: SoftHSM, count: int, forked: bool) -> list[float]:
    """Seconds from HelperProcess.start to the helper's ready frame, `count` times (the
    fork server's own start, the first time, not counted)."""
    forkserver.enabled = forked
    times = []
    for i in range(count + 1):
        t0 = time.perf_counter()
        helper = await HelperProcess.start("m", str(SOFTHSM_SO), hsm.env, 1 << 24)
        if i:  # the first one starts the fork server
            times.append(time.perf_counter() - t0)
        await helper.stop()
    await forkserver.close_all()
    return times


def _group(root: Path, hsm: SoftHSM, members: list[str], forked: bool) -> Daemon:
    """A daemon (not started) serving group `bench`, whose members are the tokens named."""
    body = 'label = "bench"\npolicy = "balance"\n' + "".join(
        f'[[member]]\nname = "{m}"\nmodule = "{SOFTHSM_SO}"\ntoken = "{m}"\n'
        f'env = {{ SOFTHSM2_CONF = "{hsm.conf}" }}\n' for m in members)
    return Daemon(root, {"bench": body}, f"fork_server = {str(forked).lower()}\n")


def tool_runs(module: Path, args: list[str], env: dict[str, str], runs: int) -> dict[str, Any]:
    """`runs` short-lived `pkcs11-tool --module MODULE ARGS` one after the other: their
    wall time, and how many failed (with the last one's stderr)."""
    failures, error = 0, ""
    t0 = time.monotonic()
    for _ in range(runs):
        r = subprocess.run(["pkcs11-tool", "--module", str(module), *args], capture_output=True,
                           text=True, timeout=60, env={**os.environ, **env})
        if r.returncode != 0:
            failures += 1
            error = f"exit {r.returncode}: {r.stderr.strip()[-300:]}"
    return {"runs": runs, "wall_s": time.monotonic() - t0, "failures": failures, "error": error}


def _cpu(daemon: Daemon) -> float:
    """Stops the daemon; its CPU seconds and those of the descendants it reaped."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    _, _, usage = os.wait4(daemon.proc.pid, 0)
    daemon.proc = None
    return usage.ru_utime + usage.ru_stime


def cpu_per_app(root: Path, hsm: SoftHSM, runs: int, forked: bool,
                members: tuple[str, ...] = ("b1",), tool_args: tuple[str, ...] = ("-O",),
                settle: float = 1.0) -> dict[str, Any]:
    """`runs` × `pkcs11-tool --module p11p-client.so TOOL_ARGS` on a fresh daemon (group
    `bench` over `members`): tool_runs' figures, and the daemon's and helpers' CPU per
    application in ms (less an idle daemon's, started and stopped the same way). `settle`:
    seconds for the warm pool to fill after the start (half as long after the runs)."""
    totals = []
    result: dict[str, Any] = {}
    for n in (0, runs):
        daemon = _group(root / f"cpu-{forked}-{n}", hsm, list(members), forked)
        daemon.start(log_level="info")
        try:
            time.sleep(settle)  # the warm pool fills
            if n:
                result = tool_runs(CLIENT_SO, list(tool_args), daemon.env, n)
            else:
                time.sleep(settle / 2)
            time.sleep(settle / 2)
            totals.append(_cpu(daemon))
        finally:
            daemon.stop()
    result.update(idle_cpu_s=totals[0], loaded_cpu_s=totals[1],
                  cpu_ms_per_app=(totals[1] - totals[0]) / runs * 1000)
    return result


def helper_pss(root: Path, hsm: SoftHSM, apps: int, forked: bool,
               members: tuple[str, ...] = ("b1", "b2"), settle: float = 1.0) -> dict[str, Any]:
    """The helpers' PSS in MB (MiB) with `apps` applications (each a session open, not
    logged in) on group `bench` over `members`, `settle` seconds after the last one
    started: mean, min, max, how many helpers."""
    daemon = _group(root / f"pss-{forked}", hsm, list(members), forked)
    daemon.start(log_level="info")
    procs = []
    try:
        for _ in range(apps):
            p = subprocess.Popen([sys.executable, "-c", APP], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, **daemon.env})
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            procs.append(p)
        time.sleep(settle)
        pss = []
        for pid in helper_pids(daemon.pid):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss.append(int(line.split()[1]) / 1024)
        return {"apps": apps, "members": len(members), "helpers": len(pss),
                "mean_mb": statistics.mean(pss) if pss else None,
                "min_mb": min(pss, default=None), "max_mb": max(pss, default=None)}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--apps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hsm = SoftHSM(root / "softhsm")
        for label in ("b1", "b2"):
            hsm.init_token(label)
        for forked in (False, True):
            name = "fork server" if forked else "own process"
            times = asyncio.run(starts(hsm, args.starts, forked))
            print(f"{name}: helper start to ready frame: median {statistics.median(times) * 1000:.1f} ms "
                  f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, n={len(times)})")
            cpu = cpu_per_app(root, hsm, args.runs, forked)
            failed = f" ({cpu['failures']} failed: {cpu['error']})" if cpu["failures"] else ""
            print(f"{name}: {args.runs} x pkcs11-tool -O: {cpu['wall_s']:.2f} s{failed}; "
                  f"daemon+helper CPU {cpu['cpu_ms_per_app']:.1f} ms per application")
            pss = helper_pss(root, hsm, args.apps, forked)
            print(f"{name}: {args.apps} applications on two members: {pss['helpers']} helpers, "
                  f"average PSS {pss['mean_mb']:.2f} MB")


if __name__ == "__main__":
    main()
