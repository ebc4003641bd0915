"""Member failure and session loss: a failed member leaves rotation everywhere and its
recovery starts (once); a lost member session resets what the application had on that
member, to be rebuilt with replay at its next use.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import TOKEN_UNFIT, MemberUnavailable
from p11p.daemon.health import hold_out
from p11p.daemon.members import Member, MemberState
from p11p.daemon.shapes import CODE, SHAPES
from p11p.daemon.virtual import VirtualSession
from p11p.protocol.constants import CKR, rv_name

if TYPE_CHECKING:
    from p11p.daemon.router import Router

STALE_LOGIN = frozenset({CKR["CKR_USER_ALREADY_LOGGED_IN"], CKR["CKR_USER_ANOTHER_ALREADY_LOGGED_IN"]})
log = logging.getLogger("p11p.ha")


class Failures:
    def __init__(self, router: Router) -> None:
        self.r = router

    def member_failed(self, member: Member, exc: MemberUnavailable, function: str) -> None:
        """Takes a member out of rotation and starts its recovery (once)."""
        daemon = self.r.daemon
        for ctx in list(daemon.contexts.values()):
            ctx.forget_member(member)
        if member.health.state in (MemberState.FAILED, MemberState.RECOVERING,
                                   MemberState.DISABLED):
            return
        group = member.group
        member.mark(MemberState.FAILED, exc.rv, str(exc))
        log.error("member failure detected: group=%s member=%s slot=%s function=%s call=%s "
                  "rv=%s (%s)", group.label, member.name, member.slot_id,
                  exc.function or function, function, rv_name(exc.rv), exc)
        member.helpers.discard()
        hold_out(member)
        if not group.present:
            log.error("group out of service: group=%s: no usable member", group.label)
            daemon.slot_event(group)
        group.notify()
        daemon.recovery.start(member)

    async def reset_member(self, ctx: ApplicationContext, member: Member) -> None:
        """After a session-lost code: close what is left of this context's sessions on
        the member (as the HSM did) and forget them; they are rebuilt on next use."""
        for vs in list(ctx.sessions.values()):
            if vs.direct is not None and vs.direct.member is member:
                await self.r.daemon.direct.revoke(vs)
        if ctx.has_helper(member) and member.slot_id is not None:
            try:
                reply = await self.r.link.raw(ctx, member,
                                              [CODE["C_CloseAllSessions"], member.slot_id])
            except MemberUnavailable:
                pass
            else:
                if reply[0] != CKR["CKR_OK"]:
                    # the module kept them (and their objects, which the rebuild makes
                    # again): its helper goes, and the module with it
                    log.warning("%s member=%s C_CloseAllSessions returned %s: the helper "
                                "is replaced", ctx.name, member.name, rv_name(reply[0]))
                    ctx.forget_member(member)
                    return
        for vs in ctx.sessions.values():
            vs.real.pop(member, None)  # rebuilt (with replay) on next use
        for key in [k for k in ctx.by_real if k[0] is member]:
            ctx.by_real.pop(key).real.pop(member, None)
        ctx.logged_in.discard(member)
        ctx.utility.pop(member, None)

    async def login_unfit(self, ctx: ApplicationContext, vs: VirtualSession,
                          frame: list[Any], reply: list[Any]) -> list[Any]:
        """The application's C_Login answered CKR_USER_PIN_NOT_INITIALIZED (or
        CKR_TOKEN_NOT_RECOGNIZED) by its member: tried on another member; when the PIN is
        good there, the first member's token cannot log anybody in and it fails (as when
        p11p's own login there is refused: bind.login_on). When it is refused there too,
        that is the token's answer, and no member fails."""
        unfit = vs.member
        if (reply[0] not in TOKEN_UNFIT or unfit is None or not self.r.bind.rebuildable(vs)
                or not self.r.place.others(ctx, vs, SHAPES[frame[0]], frame, {unfit})):
            return reply
        again = await self.r.call(ctx, vs, frame, {unfit})
        if again[0] == CKR["CKR_OK"]:
            self.member_failed(unfit, MemberUnavailable(
                unfit.name, f"C_Login returned {rv_name(reply[0])}", reply[0],
                function="C_Login"), "C_Login")
        return again

    async def stale_login(self, ctx: ApplicationContext, vs: VirtualSession,
                          frame: list[Any], reply: list[Any]) -> list[Any]:
        """The application's C_Login, while p11p knows it logged out (or never logged
        in), answered CKR_USER_ALREADY_LOGGED_IN (or ANOTHER): its member kept a login
        p11p does not know of (a close the module answered as done did not end its last
        session, say). Accepted as it is, a wrong PIN would pass: the member logs out
        there, and the login is tried once more."""
        member = vs.member
        real = vs.real.get(member) if member is not None else None
        if reply[0] not in STALE_LOGIN or member is None or real is None:
            return reply
        log.warning("stale login: %s member=%s C_Login returned %s while the application "
                    "is logged out: logged out there, and the login tried again", ctx.name,
                    member.name, rv_name(reply[0]))
        try:
            await self.r.link.raw(ctx, member, [CODE["C_Logout"], real])
        except (MemberUnavailable, budget.CallExpired):
            return reply
        ctx.logged_in.discard(member)
        return await self.r.call(ctx, vs, frame)
