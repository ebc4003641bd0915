"""Standby logins: an application logged in to a group is logged in, in the background,
on each member in service where it has no member session yet (on p11p's own member
session there), and again on a member that returns to service.

Without it the first call that moves to another member (its first member failed or hung)
opens a session there and logs in within what is left of its call_timeout: a third of
it after a hang, which a module's C_Login under load can outlive, failing the second
member too (the group out of service for a hiccup of one member). With it, a failover
costs a C_OpenSession. The login stays where the lazy path puts it too (bind.login_on):
a standby login that failed, or has not run yet, is done by the next call there.

These logins run outside any application call: each wait has a fresh call_timeout
(budget.py), and a member that hangs or fails in one is failed by its own health, as
in recovery. They end with their application (`forget`). A group's `standby_logins =
false` turns them off (an HSM that counts sessions or logins against a limit). Only the user's login is
kept in standby: a Security Officer's needs a read-write session, which p11p's own is
not, and it is rare enough to be logged in when it is used.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from p11p.daemon import budget
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import CKError, MemberUnavailable
from p11p.daemon.shapes import SessionVanished
from p11p.protocol.constants import CKU

if TYPE_CHECKING:
    from p11p.daemon.members import Group, Member
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.ha")
USER = CKU["CKU_USER"]


class Standby:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._tasks: dict[ApplicationContext, dict[Member, asyncio.Task[None]]] = {}
        # one standby login at a time per member: a member returning to service does not
        # take every application's login at once (SoftHSM2's file store, for one, answers
        # concurrent logins of several processes CKR_GENERAL_ERROR now and then)
        self._turns: dict[Member, asyncio.Lock] = {}

    def logged_in(self, ctx: ApplicationContext, group: Group) -> None:
        """`ctx` logged in to `group`: the members where it is not logged in yet."""
        for member in group.members:
            self._start(ctx, member)

    def member_back(self, member: Member) -> None:
        """`member` is in service again: the applications logged in to its group."""
        for ctx in list(self.daemon.contexts.values()):
            self._start(ctx, member)

    def forget(self, ctx: ApplicationContext) -> None:
        """`ctx` ends: its standby logins stop."""
        for task in self._tasks.pop(ctx, {}).values():
            task.cancel()

    async def settle(self, ctx: ApplicationContext, group: Group) -> None:
        """`ctx` logged out of `group`: waits (within the call's time) for its standby
        logins there that are running, each of which logs out again once its C_Login is
        done. Else a call between that C_Login and that C_Logout would run logged in
        after the application's C_Logout returned."""
        running = [t for m, t in self._tasks.get(ctx, {}).items() if m.group is group]
        if running:
            await asyncio.wait(running, timeout=budget.remaining(group))

    def stop(self) -> None:
        for ctx in list(self._tasks):
            self.forget(ctx)

    def _wanted(self, ctx: ApplicationContext, member: Member) -> bool:
        login = ctx.logins.get(member.group)
        return (member.group.config.standby_logins and not ctx.closed and login is not None and login[0] == USER
                and member.placeable and member not in ctx.logged_in)  # not a draining one

    def _start(self, ctx: ApplicationContext, member: Member) -> None:
        if not self._wanted(ctx, member):
            return
        tasks = self._tasks.setdefault(ctx, {})
        if member in tasks:
            return
        task = asyncio.get_running_loop().create_task(self._login(ctx, member))
        tasks[member] = task

        def done(_: asyncio.Task[None]) -> None:
            mine = self._tasks.get(ctx)
            if mine is not None and mine.get(member) is task:
                del mine[member]
                if not mine:
                    del self._tasks[ctx]

        task.add_done_callback(done)

    async def _login(self, ctx: ApplicationContext, member: Member) -> None:
        budget.outside()  # not the application call that started it: its own deadlines
        group = member.group
        bind = self.daemon.router.bind
        turn = self._turns.setdefault(member, asyncio.Lock())
        try:
            async with turn, ctx.utility_lock(member):
                if not self._wanted(ctx, member):
                    return
                real = await bind.utility_session(ctx, member)
            now = ctx.logins.get(group)
            if (now is None or now[0] != USER) and member in ctx.logged_in:
                # the application logged out while this login ran: out there too (or,
                # unconfirmed, its helper there replaced, as for its own logout)
                await bind.log_out_on(ctx, member, real)
        except MemberUnavailable as exc:
            self.daemon.router.failures.member_failed(member, exc, "C_Login")
        except (CKError, SessionVanished, budget.CallExpired) as exc:
            # the next call there logs in (bind.login_on), or shows the error then
            log.info("%s member=%s: standby login not done: %s", ctx.name, member.name,
                     exc or type(exc).__name__)
