"""Application contexts: one per C_Initialize of the client library in one process.

Login state belongs to an application, so each context has its own helper per member
(its own module instance and login) and its own virtual handles. A context lives while
one of its connections is open; when the process is gone (or calls C_Finalize) its
member sessions are closed and its helpers stop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget
from p11p.daemon.errors import CKError, MemberUnavailable
from p11p.daemon.handles import HandleCounter, HandleTable
from p11p.daemon.helperproc import CallTimedOut, HelperLimit, HelperProcess
from p11p.daemon.virtual import ObjectIdentity, VirtualObject, VirtualSession
from p11p.protocol.constants import CKR

if TYPE_CHECKING:
    from p11p.daemon.members import Group, Member

log = logging.getLogger("p11p.context")


class ApplicationContext:
    """Sessions, objects, logins and helpers of one application."""

    def __init__(self, key: tuple[int, bytes], uid: int, gid: int, pid: int, prog: str,
                 counter: HandleCounter) -> None:
        self.key = key
        self.uid, self.gid, self.pid, self.prog = uid, gid, pid, prog
        self.name = f"ctx={key[1][:4].hex()} pid={pid}"
        self.connections = 0
        self.closed = False
        self.sessions: HandleTable[VirtualSession] = HandleTable(
            counter, CKR["CKR_SESSION_HANDLE_INVALID"])
        self.objects: HandleTable[VirtualObject] = HandleTable(
            counter, CKR["CKR_OBJECT_HANDLE_INVALID"])
        self.by_real: dict[tuple[Member, int], VirtualObject] = {}
        # sessions of the client library's being opened here (OPEN_AT), by handle
        self.opening: dict[int, asyncio.Future[None]] = {}
        self.token_index: dict[tuple[Group, ObjectIdentity], VirtualObject] = {}
        self._helpers: dict[Member, asyncio.Future[HelperProcess]] = {}
        # Login per group: (user type, PIN). Kept in memory only, to log in again on
        # another member or after a member lost its sessions; dropped with the
        # context. Never logged.
        self.logins: dict[Group, tuple[int, bytes]] = {}
        # C_FindObjectsInit results: (group, user type logged in or None, template) ->
        # (expiry, the group's objects_generation, virtual handles); dispatch.find_init
        self.find_cache: dict[tuple[Group, int | None, bytes],
                              tuple[float, int, list[int]]] = {}
        self.logged_in: set[Member] = set()  # members where this context is logged in
        self.utility: dict[Member, int] = {}  # a member session for p11p's own look-ups
        self._utility_locks: dict[Member, asyncio.Lock] = {}
        self.events: asyncio.Queue[int] = asyncio.Queue()
        self.finalized = asyncio.Event()
        self.grace: asyncio.TimerHandle | None = None
        self.in_flight = 0
        # taken back by a restarted daemon, its client library not back yet (takeback.py)
        self.waiting = False
        # logins a restarted daemon found no helper to keep (group: user type): the
        # client library's hello may bring them (daemon/takeback.py)
        self.lost_logins: dict[Group, int] = {}
        self.saves = 0  # state files written (daemon/resume.py, Resume.mark)
        self.state_key = os.urandom(32)  # the state file's (daemon/resume.py): helpers keep it
        self.over_limit: str | None = None  # why every call is refused
        self.limit_logged: set[str] = set()
        # virtual session handle -> (arrival, when it was reported) of a direct call that
        # outlived call_timeout on a member found hung: the call the client sends here
        # next, at once, continues it (the same deadline; direct.py, budget.py)
        self.carried: dict[int, tuple[float, float]] = {}

    def __repr__(self) -> str:
        return f"<{self.name}>"

    # -- helpers ----------------------------------------------------------------------

    async def helper(self, member: Member, deadline: float | None = None) -> HelperProcess:
        """This context's helper for `member`, started (or taken warm) on first use.
        `deadline` (monotonic): the application call's; a start that outlives it is
        killed and raises CallTimedOut, and so does waiting for another call's start."""
        fut = self._helpers.get(member)
        if fut is not None:
            if not fut.done():
                if deadline is None:
                    return await asyncio.shield(fut)
                given = deadline - time.monotonic()
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), max(0.0, given))
                except TimeoutError:
                    if not budget.fair(given, member.group):
                        raise budget.CallExpired() from None
                    raise CallTimedOut(member.name, "helper start outlived call_timeout") from None
                except budget.CallExpired:
                    # the call that started it ran out of time, not the member: start anew
                    return await self.helper(member, deadline)
            if fut.exception() is None:
                helper = fut.result()
                if helper.alive:
                    return helper
                if not helper.stopping:  # it died by itself: the member failed
                    raise MemberUnavailable(member.name, helper.why)
            self.forget_member(member)
        if self.closed:
            raise CKError(CKR["CKR_CRYPTOKI_NOT_INITIALIZED"])
        starting: asyncio.Future[HelperProcess] = asyncio.get_running_loop().create_future()
        self._helpers[member] = starting

        def fail(exc: Exception) -> None:
            # every caller waiting on this start gets the failure: none waits forever
            if not starting.done():
                starting.set_exception(exc)
                starting.exception()
            if self._helpers.get(member) is starting:
                del self._helpers[member]

        left = None if deadline is None else deadline - time.monotonic()
        try:
            helper = await member.helpers.take(deadline)
        except (MemberUnavailable, HelperLimit, budget.CallExpired) as exc:
            fail(exc)
            if isinstance(exc, HelperLimit):
                raise CKError(CKR["CKR_HOST_MEMORY"], "max_helpers reached") from None
            if isinstance(exc, CallTimedOut) and left is not None \
                    and not budget.fair(left, member.group):
                # the call had too little time left for a start: its own end, not the
                # member's failure (invariant 3)
                raise budget.CallExpired() from None
            raise
        except BaseException:  # cancelled (its application went away), or a bug
            fail(MemberUnavailable(member.name, "helper start interrupted"))
            raise
        if self._helpers.get(member) is not starting or self.closed:
            # forgotten while it started (the member failed meanwhile, or the context
            # ended): it goes, and so do the calls that waited for it
            replaced = MemberUnavailable(member.name, "helper replaced while starting")
            fail(replaced)
            await helper.stop()
            raise replaced
        starting.set_result(helper)
        # it may outlive the daemon, keeping the key of our state file (daemon/resume.py)
        helper.make_adoptable(self.pid, self.state_key)
        log.debug("%s member=%s helper pid=%d", self.name, member.name, helper.pid)
        return helper

    def utility_lock(self, member: Member) -> asyncio.Lock:
        lock = self._utility_locks.get(member)
        if lock is None:
            lock = self._utility_locks[member] = asyncio.Lock()
        return lock

    def live_helpers(self) -> list[tuple[Member, HelperProcess]]:
        return [(m, f.result()) for m, f in self._helpers.items()
                if f.done() and f.exception() is None and f.result().alive]

    def adopt_helpers(self, helpers: dict[Member, HelperProcess]) -> None:
        """The helpers a restarted daemon took back (daemon/resume.py)."""
        loop = asyncio.get_running_loop()
        for member, helper in helpers.items():
            fut: asyncio.Future[HelperProcess] = loop.create_future()
            fut.set_result(helper)
            self._helpers[member] = fut

    def has_helper(self, member: Member) -> bool:
        return member in self._helpers

    def forget_member(self, member: Member, gently: bool = False) -> None:
        """Everything this context had on `member` is gone (its helper died, or the
        member lost our sessions): member sessions, object handles, login. The virtual
        sessions and objects stay; they are rebuilt where they are used next. Its helper
        is killed; `gently`, for one that answers but must go (a logout it did not
        confirm), it is stopped as at an application's end (its calls finish, C_Finalize;
        killed only past a time-out), not cut off in the middle of a token write."""
        fut = self._helpers.pop(member, None)
        if fut is not None and fut.done() and fut.exception() is None:
            helper = fut.result()
            if gently:
                helper.stopping = True  # not this context's any more: no death to report
                asyncio.get_running_loop().create_task(helper.stop(),
                                                       context=contextvars.Context())
            else:
                helper.kill()
        for vs in self.sessions.values():
            vs.real.pop(member, None)
            if vs.direct is not None and vs.direct.member is member:
                vs.unbind()  # its helper is killed: nothing is served there any more
        for key in [k for k in self.by_real if k[0] is member]:
            self.by_real.pop(key).real.pop(member, None)
        self.logged_in.discard(member)
        self.utility.pop(member, None)

    # -- sessions ---------------------------------------------------------------------

    def add_session(self, group: Group, flags: int, handle: int | None = None) -> VirtualSession:
        """A new session: its handle from the counter, or the one the client library
        chose (OPEN_AT; checked free and in its range by the caller)."""
        vs = VirtualSession(handle or 0, self, group, flags)
        if handle is None:
            vs.handle = self.sessions.add(vs)
        else:
            self.sessions.add_at(handle, vs)
        return vs

    def forget_session(self, vs: VirtualSession) -> None:
        """Drops a closed session and the session objects it made."""
        vs.unbind()  # revoked already by whoever closed it, or its helpers go with it
        self.carried.pop(vs.handle, None)
        self.sessions.remove(vs.handle)
        for vobj in list(vs.objects):
            self.forget_object(vobj)
        vs.objects.clear()
        if not any(s.group is vs.group for s in self.sessions.values()):
            # all sessions on the token closed: the application is logged out (§5.6),
            # and its object handles there end (as the token's own do)
            self.logins.pop(vs.group, None)
            for member in vs.group.members:
                self.logged_in.discard(member)
            self.forget_objects(vs.group)

    def forget_objects(self, group: Group, private_only: bool = False) -> None:
        """Ends the application's handles of objects on `group` (all, or the private
        ones when it logs out: a token makes them unreachable; the objects stay)."""
        for vobj in self.objects.values():
            if vobj.group is group and (vobj.private or not private_only):
                self.forget_object(vobj)
        # cached search results name those handles
        self.find_cache = {k: v for k, v in self.find_cache.items() if k[0] is not group}

    # -- objects ----------------------------------------------------------------------

    def register(self, vobj: VirtualObject, member: Member, real: int, group: Group) -> None:
        vobj.group = group
        vobj.real[member] = real
        self.by_real[(member, real)] = vobj
        if vobj.is_token and vobj.identity is not None:
            self.token_index.setdefault((group, vobj.identity), vobj)

    def unregister(self, vobj: VirtualObject, member: Member) -> None:
        """`vobj` has no handle on `member` any more (looked up again when needed)."""
        real = vobj.real.pop(member, None)
        if real is not None and self.by_real.get((member, real)) is vobj:
            del self.by_real[(member, real)]

    def new_object(self) -> VirtualObject:
        vobj = VirtualObject()
        vobj.handle = self.objects.add(vobj)
        return vobj

    def forget_object(self, vobj: VirtualObject) -> None:
        if not vobj.is_token:  # other objects' recipes may still name it as their source
            vobj.destroyed = True
        self.objects.remove(vobj.handle)
        for member, real in vobj.real.items():
            if self.by_real.get((member, real)) is vobj:
                del self.by_real[(member, real)]
        # its member handles end with it: as a recipe's source it is made again (and
        # destroyed after) where a copy of it is remade
        vobj.real.clear()
        for key in [k for k, v in self.token_index.items() if v is vobj]:
            del self.token_index[key]
        if vobj.owner is not None:
            vobj.owner.objects.discard(vobj)

    # -- end --------------------------------------------------------------------------

    async def close(self) -> None:
        """Ends the context: the helpers finalize their modules (closing the member
        sessions) and exit; handles and the PIN are dropped."""
        if self.closed:
            return
        self.closed = True
        self.finalized.set()
        self.logins.clear()
        for vs in self.sessions.values():
            vs.unbind()
            self.sessions.remove(vs.handle)
        for vobj in self.objects.values():
            self.objects.remove(vobj.handle)
        self.by_real.clear()
        self.token_index.clear()
        await asyncio.gather(*(h.count_direct(m.health) for m, h in self.live_helpers()))
        helpers = [(m, f.result()) for m, f in self._helpers.items()
                   if f.done() and f.exception() is None]
        self._helpers.clear()
        # each ends, or serves the next application once clean (HelperPool.recycle)
        await asyncio.gather(*(m.helpers.recycle(h) for m, h in helpers),
                             return_exceptions=True)
        kept = sum(1 for _, h in helpers if h.alive and not h.stopping)
        log.info("%s ended (%d helpers stopped, %d kept for other applications)", self.name,
                 len(helpers) - kept, kept)

    def sessions_on(self, member: Member) -> int:
        return sum(1 for vs in self.sessions.values() if member in vs.real) + (
            1 if member in self.utility else 0)

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "prog": self.prog,
                "sessions": len(self.sessions), "objects": len(self.objects),
                "connections": self.connections,
                "logged_in": sorted(m.name for m in self.logged_in)}
