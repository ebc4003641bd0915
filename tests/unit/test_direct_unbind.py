"""DIRECT_UNBIND with UNBIND_TIMEOUT (daemon/direct.py): a client's report that a direct
call outlived call_timeout fails the member only on the daemon's own evidence, the
helper's account of how long its oldest direct call has been inside the module
(DESIGN, invariants 2 and 3). Fakes stand for the member, its helper and the router."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from p11p.daemon.context import ApplicationContext
from p11p.daemon.direct import UNBIND_TIMEOUT, Binding, Direct
from p11p.daemon.handles import HandleCounter
from p11p.daemon.helperproc import CallTimedOut, HelperProcess


class _Helper:
    def __init__(self, stuck: float | None) -> None:
        self.stuck = stuck  # None: the helper does not answer
        self.alive = True
        self.killed = False
        self.calls: list[Any] = []

    async def direct_stuck(self, timeout: float) -> float:
        if self.stuck is None:
            raise CallTimedOut("m", "no answer")
        return self.stuck

    def kill(self) -> None:
        self.killed, self.alive = True, False

    async def call(self, request: list[Any], timeout: float) -> list[Any]:
        self.calls.append(request)
        return [0]


class _Router:
    """The router's failures and bind stages, as far as the direct path uses them."""

    def __init__(self) -> None:
        self.failed: list[Any] = []
        self.forgotten: list[Any] = []
        self.failures = self.bind = self

    def member_failed(self, member: Any, exc: Exception, function: str) -> None:
        self.failed.append((member, exc))

    async def close_on(self, ctx: Any, vs: Any, member: Any) -> None:
        self.forgotten.append(member)


def _setup(stuck: float | None) -> tuple[Direct, _Router, ApplicationContext, Any, _Helper]:
    router = _Router()
    direct = Direct(router)  # type: ignore[arg-type]
    ctx = ApplicationContext((1, b"0123456789abcdef"), 0, 0, 1, "test", HandleCounter())
    group: Any = SimpleNamespace(label="g", config=SimpleNamespace(call_timeout=2.0,
                                                                   hold_timeout=2.0),
                                 members=[None, None])  # a member's part: 2/3 of 2 s
    member: Any = SimpleNamespace(name="m", group=group, health=SimpleNamespace(bound=0))
    vs = ctx.add_session(group, 6)
    helper = _Helper(stuck)
    vs.bind(Binding(member, 7, helper, 4097))  # type: ignore[arg-type]
    return direct, router, ctx, vs, helper


@pytest.mark.asyncio
async def test_a_timeout_the_helper_confirms_fails_the_member_and_carries_the_deadline() -> None:
    direct, router, ctx, vs, helper = _setup(stuck=1.4)
    assert await direct.unbind(ctx, [1004, vs.handle, UNBIND_TIMEOUT]) == [0]
    assert helper.killed and len(router.failed) == 1
    assert isinstance(router.failed[0][1], CallTimedOut)
    arrival, reported = ctx.carried[vs.handle]
    assert abs(reported - time.monotonic()) < 1 and abs(reported - arrival - 1.4) < 0.01
    assert vs.direct is None


@pytest.mark.asyncio
async def test_a_helper_that_does_not_answer_is_evidence_too() -> None:
    direct, router, ctx, vs, helper = _setup(stuck=None)
    assert await direct.unbind(ctx, [1004, vs.handle, UNBIND_TIMEOUT]) == [0]
    assert helper.killed and len(router.failed) == 1


@pytest.mark.asyncio
async def test_the_clients_word_alone_fails_nothing() -> None:
    """No direct call has been in the module that long: the binding ends (revoked at
    the helper, the member session forgotten), the member and the helper stay."""
    direct, router, ctx, vs, helper = _setup(stuck=0.0)
    assert await direct.unbind(ctx, [1004, vs.handle, UNBIND_TIMEOUT]) == [0]
    assert not helper.killed and router.failed == [] and vs.handle not in ctx.carried
    assert helper.calls and helper.calls[0][0] == -4  # FAST_REVOKE
    assert vs.direct is None


def test_the_fake_helper_has_the_methods_it_stands_for() -> None:
    for name in ("direct_stuck", "kill", "call"):
        assert hasattr(HelperProcess, name)
