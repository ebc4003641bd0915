"""An application context's helper start, when the member fails while it starts: every
call that waited for that start gets the failure (MemberUnavailable), none waits forever.
The member here is a stand-in with the one method the context uses (no PKCS#11 involved:
what is tested is the bookkeeping of the start)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.handles import HandleCounter


class _Helper:
    alive, stopping, pid = True, False, 1
    stopped = False

    async def stop(self) -> None:
        self.stopped = True


class _SlowMember:
    name = "slow"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.helper = _Helper()
        self.helpers = self  # its pool (daemon/pool.py): `take` is all a context uses

    async def take(self, deadline: float | None = None) -> _Helper:
        await self.release.wait()
        return self.helper


@pytest.mark.asyncio
async def test_callers_waiting_on_a_start_the_member_lost_are_told() -> None:
    ctx = ApplicationContext((1, b"0123456789abcdef"), 0, 0, 1, "test", HandleCounter())
    member: Any = _SlowMember()
    first = asyncio.create_task(ctx.helper(member))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(ctx.helper(member))  # waits for the same start
    await asyncio.sleep(0)
    ctx.forget_member(member)  # the member failed while its helper started
    member.release.set()
    for task in (first, waiting):
        with pytest.raises(MemberUnavailable):
            await asyncio.wait_for(task, 5)
    assert member.helper.stopped


@pytest.mark.asyncio
async def test_callers_waiting_on_a_cancelled_start_are_told() -> None:
    ctx = ApplicationContext((1, b"0123456789abcdef"), 0, 0, 1, "test", HandleCounter())
    member: Any = _SlowMember()
    first = asyncio.create_task(ctx.helper(member))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(ctx.helper(member))
    await asyncio.sleep(0)
    first.cancel()  # its application went away
    with pytest.raises(MemberUnavailable):
        await asyncio.wait_for(waiting, 5)


@pytest.mark.asyncio
async def test_a_helper_start_and_its_waiters_draw_from_the_call_deadline() -> None:
    """A start that never ends (a hung C_Initialize): the caller that started it and a
    caller waiting for it both get CallTimedOut at their call's deadline, not later."""
    import time
    from types import SimpleNamespace

    from p11p.daemon.helperproc import CallTimedOut
    ctx = ApplicationContext((1, b"0123456789abcdef"), 0, 0, 1, "test", HandleCounter())
    member: Any = _SlowMember()
    seen: list[float | None] = []

    async def hung_take(deadline: float | None = None) -> _Helper:
        seen.append(deadline)
        assert deadline is not None
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))  # the start's own time-out
        raise CallTimedOut(member.name, "helper did not start")

    member.take = hung_take
    member.group = SimpleNamespace(config=SimpleNamespace(call_timeout=0.3, hold_timeout=1.0))
    start = time.monotonic()
    first = asyncio.create_task(ctx.helper(member, start + 0.3))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(ctx.helper(member, start + 0.2))
    for task in (waiting, first):
        with pytest.raises(CallTimedOut):
            await asyncio.wait_for(task, 5)
    assert time.monotonic() - start < 1.0
    assert seen == [start + 0.3]
