"""`make soak`: the model-based differential machine (test_model.py) with random seeds
for SOAK_MINUTES minutes, the time split between the policies (failover on two members,
balance on three), hangs included. Prints the sequences and calls run; exits non-zero on
the first discrepancy, with its shrunk sequence.

    python3 tests/model/soak.py --minutes 30 [--policy failover|balance] [--steps 60]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from conftest import POLICIES  # noqa: E402
from harness import Discrepancy, Env, make_tokens  # noqa: E402
from machine import run_machine  # noqa: E402


class Stopped(BaseException):
    """A SIGTERM (a timeout's, make's): the soak unwinds, its daemons stopped by their
    PIDs (it left them running before)."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--policy", choices=sorted(POLICIES), action="append")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--examples", type=int, default=10, help="sequences per round")
    ap.add_argument("--shrink-seconds", type=float, default=600.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    policies = args.policy or sorted(POLICIES)
    root = Path(tempfile.mkdtemp(prefix="p11p-soak-"))
    print(f"soak: {args.minutes} min over {', '.join(policies)}; files in {root}", flush=True)
    hsm, keys = make_tokens(root)
    envs = {p: Env(root / f"env-{p}", hsm, keys, p, POLICIES[p]) for p in policies}
    totals = {p: [0, 0] for p in policies}
    deadline = time.monotonic() + args.minutes * 60
    rounds = 0
    try:
        while time.monotonic() < deadline:
            policy = policies[rounds % len(policies)]
            rounds += 1
            try:
                runner = run_machine(envs[policy], args.examples, args.steps, derandomize=False,
                                     hangs=True, shrink_seconds=args.shrink_seconds)
            except Discrepancy as exc:
                print(f"\nDISCREPANCY ({policy}, round {rounds}):\n{exc}", flush=True)
                return 1
            except (Exception, SystemExit) as exc:  # the daemon broke (its admin answers
                # no more, say): a finding too, said as one, not a silent end
                print(f"\nSOAK ERROR ({policy}, round {rounds}): {type(exc).__name__}: {exc}\n"
                      f"daemon log: {envs[policy].group.daemon.log}", flush=True)
                return 2
            totals[policy][0] += runner.examples
            totals[policy][1] += runner.calls
            left = max(deadline - time.monotonic(), 0) / 60
            print(f"round {rounds} {policy}: {runner.examples} sequences, "
                  f"{runner.calls} calls; total " + ", ".join(
                      f"{p} {s} sequences {c} calls" for p, (s, c) in totals.items())
                  + f"; {left:.1f} min left", flush=True)
    except Stopped:
        print("soak: stopped (SIGTERM)", flush=True)
        return 143
    finally:
        for env in envs.values():
            env.close()
    repairs = sum(env.repairs for env in envs.values())
    print(f"soak: no discrepancy ({repairs} SoftHSM2 token files put back)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
