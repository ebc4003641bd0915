"""Model-based differential tests (issue 12): generated call sequences of two
applications interleaved with member events, run through p11p (both policies) and on one
SoftHSM2 token directly; every result compared (harness.py). `make test` runs this
bounded, derandomized part; `make soak` runs the same machine with random seeds. The
data plane and the sessions the client library opens itself are on in `model_env`
(unless P11P_MODEL_DATA_PLANE=0), and off in the second bounded run: both must agree
with the token used directly.

Shrunk sequences that found a discrepancy are kept below as plain replays."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import POLICIES, tmp_path_factory_of
from harness import Env
from kit import SoftHSM
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
    if model_env.data_plane:  # the sequences really ran on it, and on the library's sessions
        assert _served_on_plane(model_env) > 0
        assert _client_opens(model_env) > 0


def _run_bounded(env: Env) -> None:
    start = time.monotonic()
    runner = run_machine(env, EXAMPLES, STEPS, derandomize=True, hangs=False,
                         shrink_seconds=SHRINK_SECONDS, kills=False)
    print(f"\n{env.policy} (data plane {'on' if env.data_plane else 'off'}): "
          f"{runner.examples} sequences, {runner.calls} calls, {runner.allowed} documented "
          f"differences, {time.monotonic() - start:.1f}s")
    assert runner.calls > 0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_generated_sequences_data_plane_off(request: pytest.FixtureRequest, policy: str,
                                            model_tokens: tuple[SoftHSM, Path, Path]) -> None:
    """The same bounded run with `direct_calls = false`: every call through the daemon."""
    hsm, keys, _ = model_tokens
    env = Env(tmp_path_factory_of(request).mktemp(f"env-{policy}-off"), hsm, keys, policy,
              POLICIES[policy], data_plane=False)
    try:
        _run_bounded(env)
        assert _served_on_plane(env) == 0 and _client_opens(env) == 0
    finally:
        env.close()


def _client_opens(env: Env) -> int:
    (group,) = env.group.status()["groups"]
    return int(group["client_opens"])


def _served_on_plane(env: Env) -> int:
    (group,) = env.group.status()["groups"]
    return sum(m["direct_calls_served"] for m in group["members"])
