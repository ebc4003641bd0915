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

    async def take_helper(self) -> _Helper:
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
