"""Model-based differential tests (issue 12): generated call sequences of two
applications interleaved with member events, run through p11p (both policies) and on one
SoftHSM2 token directly; every result compared (harness.py). `make test` runs this
bounded, derandomized part; `make soak` runs the same machine with random seeds.

Shrunk sequences that found a discrepancy are kept below as plain replays."""

from __future__ import annotations

import os
import time

from harness import Env
from machine import run_machine

EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "15"))
STEPS = int(os.environ.get("MODEL_STEPS", "50"))
SHRINK_SECONDS = float(os.environ.get("MODEL_SHRINK_SECONDS", "120"))


def test_generated_sequences(model_env: Env) -> None:
    start = time.monotonic()
    # hangs and helper kills are left to make soak: a kill races the daemon's notice of
    # the helper's death, and a race found here would fail make test by chance
    runner = run_machine(model_env, EXAMPLES, STEPS, derandomize=True, hangs=False,
                         shrink_seconds=SHRINK_SECONDS, kills=False)
    print(f"\n{model_env.policy}: {runner.examples} sequences, {runner.calls} calls, "
          f"{runner.allowed} documented differences, "
          f"{time.monotonic() - start:.1f}s\n  {dict(sorted(runner.kinds.items()))}")
    assert runner.calls > 0
