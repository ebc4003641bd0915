"""A helper whose start does not finish (the module hangs in C_Initialize) is never left
behind (DESIGN, invariant 4), and its start draws from the time it is given (invariant
2): past it, or when the start is cancelled (its application went away), the process is
killed. daemon/helperproc.py's HelperProcess.start, with the real helper and the fault
module."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kit import FAULTSIM_SO, SOFTHSM_SO, helper_pids, wait_for
from p11p.daemon import forkserver
from p11p.daemon.helperproc import CallTimedOut, HelperProcess


@pytest.fixture(autouse=True, params=[True, False], ids=["forked", "own-process"])
async def fork_server(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Each test with helpers forked by a fork server and with helpers of their own."""
    forkserver.enabled = request.param
    yield
    await forkserver.close_all()
    forkserver.enabled = True


def _env(tmp_path: Path) -> dict[str, str]:
    rules = tmp_path / "rules"
    rules.write_text("C_Initialize hang\n")
    return {"P11P_FAULTSIM_MODULE": str(SOFTHSM_SO), "P11P_FAULTSIM_RULES": str(rules)}


def _helpers() -> list[int]:
    return helper_pids(os.getpid())


async def test_a_start_past_its_time_is_killed(tmp_path: Path) -> None:
    before = set(_helpers())
    start = time.monotonic()
    with pytest.raises(CallTimedOut):
        await HelperProcess.start("m", str(FAULTSIM_SO), _env(tmp_path), 1 << 20, 1.0)
    assert time.monotonic() - start < 3.0
    assert wait_for(lambda: not set(_helpers()) - before, 5), _helpers()


async def test_a_cancelled_start_is_killed(tmp_path: Path) -> None:
    before = set(_helpers())
    task = asyncio.create_task(
        HelperProcess.start("m", str(FAULTSIM_SO), _env(tmp_path), 1 << 20, 30.0))
    deadline = time.monotonic() + 10
    while not set(_helpers()) - before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert set(_helpers()) - before, "the helper never started"
    await asyncio.sleep(0.5)  # inside C_Initialize, hung
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the loop reaps it
        if not set(_helpers()) - before:
            break
        await asyncio.sleep(0.05)
    assert not set(_helpers()) - before, _helpers()
