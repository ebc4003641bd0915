"""What a helper costs, with the fork server and without (`[daemon] fork_server`):

- start: HelperProcess.start to its ready frame, median of `--starts` (SoftHSM2);
- CPU: daemon and helper CPU per short-lived application (`pkcs11-tool -O`, `--runs`
  of them; the daemon's own CPU and its reaped descendants', less an idle run's);
- PSS: the helpers' average PSS (/proc/PID/smaps_rollup) with `--apps` applications
  open on a two-member group.

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


async def _starts(hsm: SoftHSM, count: int, forked: bool) -> list[float]:
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
    body = 'label = "bench"\npolicy = "balance"\n' + "".join(
        f'[[member]]\nname = "{m}"\nmodule = "{SOFTHSM_SO}"\ntoken = "{m}"\n'
        f'env = {{ SOFTHSM2_CONF = "{hsm.conf}" }}\n' for m in members)
    return Daemon(root, {"bench": body}, f"fork_server = {str(forked).lower()}\n")


def _cpu(daemon: Daemon) -> float:
    """Stops the daemon; its CPU seconds and those of the descendants it reaped."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    _, _, usage = os.wait4(daemon.proc.pid, 0)
    daemon.proc = None
    return usage.ru_utime + usage.ru_stime


def _cpu_per_app(root: Path, hsm: SoftHSM, runs: int, forked: bool) -> tuple[float, float]:
    """(CPU ms per application, wall s of the runs)."""
    totals = []
    wall = 0.0
    for n in (0, runs):
        daemon = _group(root / f"cpu-{forked}-{n}", hsm, ["b1"], forked).start()
        time.sleep(1.0)
        t0 = time.monotonic()
        for _ in range(n):
            subprocess.run(["pkcs11-tool", "--module", str(CLIENT_SO), "-O"], check=True,
                           capture_output=True, env={**os.environ, **daemon.env})
        if n:
            wall = time.monotonic() - t0
        else:
            time.sleep(0.5)
        time.sleep(0.5)
        totals.append(_cpu(daemon))
    return (totals[1] - totals[0]) / runs * 1000, wall


def _pss(root: Path, hsm: SoftHSM, apps: int, forked: bool) -> tuple[float, int]:
    """(average helper PSS in MB, helpers) with `apps` applications open."""
    daemon = _group(root / f"pss-{forked}", hsm, ["b1", "b2"], forked).start()
    procs = []
    try:
        for _ in range(apps):
            p = subprocess.Popen([sys.executable, "-c", APP], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, **daemon.env})
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            procs.append(p)
        time.sleep(1.0)
        pss = []
        for pid in helper_pids(daemon.pid):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss.append(int(line.split()[1]) / 1024)
        return statistics.mean(pss), len(pss)
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
            times = asyncio.run(_starts(hsm, args.starts, forked))
            print(f"{name}: helper start to ready frame: median {statistics.median(times) * 1000:.1f} ms "
                  f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, n={len(times)})")
            cpu, wall = _cpu_per_app(root, hsm, args.runs, forked)
            print(f"{name}: {args.runs} x pkcs11-tool -O: {wall:.2f} s; daemon+helper CPU "
                  f"{cpu:.1f} ms per application")
            pss, helpers = _pss(root, hsm, args.apps, forked)
            print(f"{name}: {args.apps} applications on two members: {helpers} helpers, "
                  f"average PSS {pss:.2f} MB")


if __name__ == "__main__":
    main()
