"""Application contexts: one per C_Initialize of the client library in one process.

Login state belongs to an application, so each context has its own helper per member
(its own module instance and login) and its own virtual handles. A context lives while
one of its connections is open; when the process is gone (or calls C_Finalize) its
member sessions are closed and its helpers stop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from p11p.daemon.errors import CKError, MemberUnavailable
from p11p.daemon.handles import HandleCounter, HandleTable
from p11p.daemon.helperproc import HelperProcess
from p11p.daemon.virtual import (
    IDENTITY_TEMPLATE,
    VirtualObject,
    VirtualSession,
    identity_from_values,
)
from p11p.protocol.constants import CKR
from p11p.protocol.spec import by_name

if TYPE_CHECKING:
    from p11p.daemon.members import Group, Member

log = logging.getLogger("p11p.context")
_GET_ATTRIBUTE_VALUE = by_name()["C_GetAttributeValue"].code


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
        self._by_real: dict[tuple[Member, int], VirtualObject] = {}
        self._helpers: dict[Member, asyncio.Future[HelperProcess]] = {}
        # Login per group: (user type, PIN). Kept in memory only, to log in again after
        # a member changes; dropped with the context. Never logged.
        self.logins: dict[Group, tuple[int, bytes]] = {}
        self.events: asyncio.Queue[int] = asyncio.Queue()
        self.finalized = asyncio.Event()
        self.grace: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<{self.name}>"

    # -- helpers ----------------------------------------------------------------------

    async def helper(self, member: Member) -> HelperProcess:
        """This context's helper for `member`, started (or taken warm) on first use."""
        fut = self._helpers.get(member)
        if fut is not None:
            if not fut.done():
                return await asyncio.shield(fut)
            if fut.exception() is None and fut.result().alive:
                return fut.result()
        if self.closed:
            raise CKError(CKR["CKR_CRYPTOKI_NOT_INITIALIZED"])
        fut = asyncio.get_running_loop().create_future()
        self._helpers[member] = fut
        try:
            helper = await member.take_helper()
        except MemberUnavailable as exc:
            fut.set_exception(exc)
            fut.exception()
            del self._helpers[member]
            raise
        fut.set_result(helper)
        log.debug("%s member=%s helper pid=%d", self.name, member.name, helper.pid)
        return helper

    def current_helper(self, member: Member) -> HelperProcess | None:
        fut = self._helpers.get(member)
        if fut is None or not fut.done() or fut.exception() is not None:
            return None
        return fut.result()

    def drop_helper(self, member: Member) -> None:
        """Forgets a helper that died; sessions and objects on it are gone too."""
        fut = self._helpers.pop(member, None)
        if fut is not None and fut.done() and fut.exception() is None:
            fut.result().kill()
        for vs in self.sessions.values():
            if vs.member is member:
                self.forget_session(vs)
        for key in [k for k in self._by_real if k[0] is member]:
            vobj = self._by_real.pop(key)
            vobj.real.pop(member, None)
            if not vobj.real:
                self.objects.remove(vobj.handle)

    # -- sessions ---------------------------------------------------------------------

    def add_session(self, group: Group, flags: int, member: Member, helper: HelperProcess,
                    real: int) -> VirtualSession:
        vs = VirtualSession(0, self, group, flags, member, helper, real)
        vs.handle = self.sessions.add(vs)
        return vs

    def forget_session(self, vs: VirtualSession) -> None:
        """Drops a closed session and the session objects it made."""
        self.sessions.remove(vs.handle)
        for vobj in vs.objects:
            self._forget_object(vobj)
        vs.objects.clear()
        if not any(s.group is vs.group for s in self.sessions.values()):
            self.logins.pop(vs.group, None)  # all sessions closed: logged out (PKCS#11 §5.6)

    # -- objects ----------------------------------------------------------------------

    def object_for(self, vs: VirtualSession, handle: object) -> int:
        """The member handle behind a virtual object handle, for the session's member."""
        vobj = self.objects.get(handle)
        real = vobj.real.get(vs.member)
        if real is None:
            raise CKError(CKR["CKR_OBJECT_HANDLE_INVALID"])
        return real

    def known_object(self, member: Member, real: int) -> VirtualObject | None:
        return self._by_real.get((member, real))

    async def object_from(self, vs: VirtualSession, real: int, created: bool) -> int:
        """The virtual handle for a member object, registering it when new."""
        vobj = self._by_real.get((vs.member, real))
        if vobj is not None and not created:
            return vobj.handle
        if vobj is not None:  # a handle reused by the module for a new object
            self._forget_object(vobj)
        vobj = VirtualObject(real={vs.member: real})
        vobj.handle = self.objects.add(vobj)
        self._by_real[(vs.member, real)] = vobj
        reply = await vs.helper.call([_GET_ATTRIBUTE_VALUE, vs.real, real, IDENTITY_TEMPLATE],
                                     vs.group.config.call_timeout)
        if len(reply) > 1 and isinstance(reply[1], list) and len(reply[1]) == len(IDENTITY_TEMPLATE):
            vobj.is_token, vobj.identity = identity_from_values(reply[1])
        if created and vobj.is_token is False:
            vobj.owner = vs
            vs.objects.add(vobj)
        return vobj.handle

    def destroyed(self, handle: int) -> None:
        vobj = self.objects.find(handle)
        if vobj is not None:
            self._forget_object(vobj)

    def _forget_object(self, vobj: VirtualObject) -> None:
        self.objects.remove(vobj.handle)
        for member, real in vobj.real.items():
            if self._by_real.get((member, real)) is vobj:
                del self._by_real[(member, real)]
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
            self.sessions.remove(vs.handle)
        for vobj in self.objects.values():
            self.objects.remove(vobj.handle)
        self._by_real.clear()
        helpers = [f.result() for f in self._helpers.values()
                   if f.done() and f.exception() is None]
        self._helpers.clear()
        await asyncio.gather(*(h.stop() for h in helpers), return_exceptions=True)
        log.info("%s ended (%d helpers stopped)", self.name, len(helpers))

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "uid": self.uid, "prog": self.prog,
                "sessions": len(self.sessions), "objects": len(self.objects),
                "connections": self.connections}
