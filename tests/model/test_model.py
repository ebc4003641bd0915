"""Model-based differential tests (issue 12): generated call sequences of two
applications interleaved with member events, run through p11p (both policies) and on one
SoftHSM2 token directly; every result compared (harness.py). `make test` runs this
bounded, derandomized part; `make soak` runs the same machine with random seeds.

Shrunk sequences that found a discrepancy are kept below as plain replays."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from harness import Discrepancy, Env, Runner, replay, shrink
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from machine import make_machine

EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "12"))
STEPS = int(os.environ.get("MODEL_STEPS", "40"))
SHRINK_SECONDS = float(os.environ.get("MODEL_SHRINK_SECONDS", "120"))


def run_machine(env: Env, examples: int, steps: int, derandomize: bool, hangs: bool,
                seed: int | None = None) -> Runner:
    """Runs the machine; on a discrepancy, shrinks the sequence that met it (delta
    debugging over the recorded steps, within SHRINK_SECONDS: hypothesis's own shrinker
    re-runs whole examples against real tokens and takes many minutes) and raises it
    with the shrunk sequence, ready to paste into test_regressions.py."""
    runner = Runner(env)
    machine = make_machine(runner, hangs=hangs)
    s = settings(max_examples=examples, stateful_step_count=steps, derandomize=derandomize,
                 database=None, deadline=None, print_blob=False,
                 phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=list(HealthCheck))
    try:
        if seed is not None:
            from hypothesis import seed as with_seed
            with_seed(seed)(lambda: run_state_machine_as_test(machine, settings=s))()
        else:
            run_state_machine_as_test(machine, settings=s)
    except Discrepancy as exc:
        log = list(runner.log)
        why = exc.signature or str(exc).splitlines()[0]
        print(f"\ndiscrepancy after {len(log)} steps ({env.policy}, "
              f"{len(env.members)} members): {exc}\n{format_steps(log)}\nshrinking...",
              flush=True)
        shrunk = shrink(env, log, why, SHRINK_SECONDS)
        detail = ""
        try:
            replay(env, shrunk, verbose=False)
        except Discrepancy as again:
            detail = str(again)
        raise Discrepancy(f"{detail or exc}\nshrunk sequence ({env.policy}, "
                          f"{len(env.members)} members, {len(shrunk)} of {len(log)} steps):\n"
                          f"{format_steps(shrunk)}") from None
    return runner


def format_steps(steps: list[dict[str, Any]]) -> str:
    return "[\n" + "".join(f"    {json.dumps(s)},\n" for s in steps) + "]"


def test_generated_sequences(model_env: Env) -> None:
    start = time.monotonic()
    runner = run_machine(model_env, EXAMPLES, STEPS, derandomize=True, hangs=False)
    print(f"\n{model_env.policy}: {runner.examples} sequences, {runner.calls} calls, "
          f"{time.monotonic() - start:.1f}s\n  {dict(sorted(runner.kinds.items()))}")
    assert runner.calls > 0
