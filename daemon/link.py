"""The execute stage: one call on one member through the application's helper, within
the call's deadline (budget.py); a member-failed code turned into MemberUnavailable.
The one place a member is spoken to: unit tests replace the helper behind it.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import MemberUnavailable, RvClass
from p11p.daemon.helperproc import CallTimedOut
from p11p.daemon.members import Member
from p11p.daemon.shapes import (
    CODE,
    DEVICE_ERROR,
    OK,
    SESSION_CLOSED,
    SESSION_HANDLE_INVALID,
    USER_NOT_LOGGED_IN,
    Reply,
    SessionVanished,
)
from p11p.protocol import spec
from p11p.protocol.constants import rv_name

if TYPE_CHECKING:
    from p11p.daemon.router import Router

log = logging.getLogger("p11p.ha")


class MemberLink:
    def __init__(self, router: Router) -> None:
        self.r = router

    async def raw(self, ctx: ApplicationContext, member: Member, request: list[Any]) -> Reply:
        """One call through the context's helper; MemberUnavailable when it cannot run.
        The helper's start and the call draw from the application call's deadline
        (budget.py): past it the helper is killed (CallTimedOut)."""
        begun = time.monotonic()
        deadline = budget.current().member_deadline(member.group)
        if deadline <= begun:
            raise budget.CallExpired()
        helper = await ctx.helper(member, deadline)
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise budget.CallExpired()
        health = member.health
        health.calls_in_flight += 1
        start = time.perf_counter()
        rv = DEVICE_ERROR
        try:
            reply: Reply = await helper.call(request, timeout)
            rv = reply[0]
        except MemberUnavailable as exc:
            exc.function = exc.function or spec.by_code()[request[0]].name
            # the member had the time since this call came to it, its helper's start
            # included: a hung start followed by a short call is the member's failure
            if isinstance(exc, CallTimedOut) and not budget.fair(deadline - begun, member.group):
                raise budget.CallExpired() from None  # killed, but not the member's failure
            raise
        finally:
            health.calls_in_flight -= 1
            health.calls_served += 1
            member.metrics.observe(time.perf_counter() - start, rv)
        return reply

    async def checked(self, ctx: ApplicationContext, member: Member, request: list[Any]) -> Reply:
        """`raw`, with a member-failed CK_RV turned into MemberUnavailable."""
        reply = await self.raw(ctx, member, request)
        if member.group.rv_classes.get(reply[0]) is RvClass.MEMBER_FAILED:
            name = spec.by_code()[request[0]].name
            raise MemberUnavailable(member.name, f"{name} returned {rv_name(reply[0])}", reply[0],
                                    function=name)
        return reply

    async def replayed(self, ctx: ApplicationContext, member: Member, request: list[Any]) -> Reply:
        """`checked`, for a call that rebuilds state on a member (an object made again,
        an operation replayed): a member that lost the application's sessions meanwhile
        is reset and SessionVanished raised, so the call is placed again; the state it
        was rebuilding is not lost for it."""
        reply = await self.checked(ctx, member, request)
        # CKR_USER_NOT_LOGGED_IN while the application is logged in: the member session
        # lost its login (policy.classify: session lost), as for a call of its own
        if reply[0] in (SESSION_HANDLE_INVALID, SESSION_CLOSED) or (
                reply[0] == USER_NOT_LOGGED_IN and member.group in ctx.logins):
            log.warning("session lost: %s member=%s function=%s rv=%s while rebuilding a "
                        "session; new session, login and replay", ctx.name, member.name,
                        spec.by_code()[request[0]].name, rv_name(reply[0]))
            await self.r.failures.reset_member(ctx, member)
            raise SessionVanished
        return reply

    async def still_serves(self, ctx: ApplicationContext, member: Member) -> bool:
        """Whether a member that answered a call with a member-failed code still answers
        a plain question (C_GetTokenInfo of its slot, on the same helper). Without this
        one application's odd arguments would take the member from everybody, and the
        call, retried after recovery, again and again."""
        if member.slot_id is None:
            return False
        try:
            reply = await self.raw(ctx, member, [CODE["C_GetTokenInfo"], member.slot_id, 0])
        except MemberUnavailable:
            return False
        return bool(reply[0] == OK)
