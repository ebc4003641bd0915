"""The dispatch table: one handler per function code, built from protocol/functions.spec.

Every call that names a session goes through one generic forwarder, which maps the
virtual session and object handles to the member's, sends the call to the member's
helper and maps handles in the reply back. Calls that name a slot, open or close
sessions, log in or out, or wait for events have their own handlers below, because the
daemon answers them from (or records them in) the virtual view.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import CKError, MemberUnavailable
from p11p.daemon.members import Group, Member
from p11p.daemon.virtual import VirtualSession
from p11p.protocol import spec
from p11p.protocol.constants import CKF, CKR, CKU, rv_name

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.dispatch")

Reply = list[Any]
Handler = Callable[[ApplicationContext, list[Any]], Awaitable[Reply]]

OK = CKR["CKR_OK"]
CKR_ARGUMENTS_BAD = CKR["CKR_ARGUMENTS_BAD"]
CKR_DEVICE_ERROR = CKR["CKR_DEVICE_ERROR"]
CKR_SLOT_ID_INVALID = CKR["CKR_SLOT_ID_INVALID"]
CKR_TOKEN_NOT_PRESENT = CKR["CKR_TOKEN_NOT_PRESENT"]
CKR_BUFFER_TOO_SMALL = CKR["CKR_BUFFER_TOO_SMALL"]
CKF_TOKEN_PRESENT = CKF["CKF_TOKEN_PRESENT"]
CKF_DONT_BLOCK = CKF["CKF_DONT_BLOCK"]
CKU_SO = CKU["CKU_SO"]
_CODE = {f.name: f.code for f in spec.functions()}
_MECH_OBJECT_FIELDS = {
    m.value: [i for i, f in enumerate(m.param.fields) if f.kind == "object"]
    for m in spec.mechanisms().values()
    if any(f.kind == "object" for f in m.param.fields)
}


def _pad(text: str, size: int) -> bytes:
    raw = text.encode()[:size]
    return raw + b" " * (size - len(raw))


class Dispatcher:
    """Maps a request `[code, arg...]` of one application context to its reply."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.table: dict[int, Handler] = {}
        special: dict[str, Handler] = {
            "C_Finalize": self.finalize,
            "C_GetSlotList": self.get_slot_list,
            "C_GetSlotInfo": self.get_slot_info,
            "C_GetTokenInfo": self.get_token_info,
            "C_GetMechanismList": self.forward_slot_call,
            "C_GetMechanismInfo": self.forward_slot_call,
            "C_InitToken": self.forward_slot_call,
            "C_OpenSession": self.open_session,
            "C_CloseSession": self.close_session,
            "C_CloseAllSessions": self.close_all_sessions,
            "C_GetSessionInfo": self.get_session_info,
            "C_Login": self.login,
            "C_Logout": self.logout,
            "C_SetPIN": self.set_pin,
            "C_DestroyObject": self.destroy_object,
            "C_WaitForSlotEvent": self.wait_for_slot_event,
        }
        for fn in spec.functions():
            if fn.name in special:
                self.table[fn.code] = special[fn.name]
            elif fn.local:
                self.table[fn.code] = self.not_supported
            elif fn.wire_args and fn.wire_args[0].kind == "session":
                self.table[fn.code] = self._session_forwarder(fn)
            else:
                raise AssertionError(f"no handler for {fn.name}")
        self.arity = {fn.code: len(fn.wire_args) + 1 for fn in spec.functions()}

    async def dispatch(self, ctx: ApplicationContext, request: list[Any]) -> Reply:
        code = request[0]
        handler = self.table.get(code) if isinstance(code, int) else None
        if handler is None:
            return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
        if len(request) != self.arity[code]:
            return [CKR_ARGUMENTS_BAD]
        if ctx.closed:
            return [CKR["CKR_CRYPTOKI_NOT_INITIALIZED"]]
        try:
            return await handler(ctx, request)
        except CKError as exc:
            return [exc.rv]

    # -- member calls -----------------------------------------------------------------

    async def member_call(self, ctx: ApplicationContext, member: Member, request: list[Any],
                          helper: Any = None) -> Reply:
        """One call on a member through this context's helper; failures become CK_RVs."""
        health = member.health
        health.calls_in_flight += 1
        try:
            if helper is None:
                helper = await ctx.helper(member)
            reply: Reply = await helper.call(request, member.group.config.call_timeout)
        except MemberUnavailable as exc:
            fn = spec.by_code()[request[0]].name
            log.error("member failure detected: group=%s member=%s function=%s rv=%s %s (%s)",
                      member.group.label, member.name, fn, rv_name(exc.rv), ctx.name, exc)
            member.health.last_rv = exc.rv
            member.health.last_error = str(exc)
            ctx.drop_helper(member)
            raise CKError(CKR_DEVICE_ERROR, str(exc)) from None
        finally:
            health.calls_in_flight -= 1
            health.calls_served += 1
        return reply

    def _session_forwarder(self, fn: spec.Function) -> Handler:
        objects = [i for i, a in enumerate(fn.wire_args, 1) if a.kind == "object"]
        mechs = [i for i, a in enumerate(fn.wire_args, 1) if a.kind == "mechanism"]
        created = [j for j, a in enumerate(fn.outputs, 1) if a.kind == "out_object"]
        found = [j for j, a in enumerate(fn.outputs, 1) if a.kind == "out_objects"]

        async def forward(ctx: ApplicationContext, req: list[Any]) -> Reply:
            vs = ctx.sessions.get(req[1])
            req[1] = vs.real
            for i in objects:
                req[i] = ctx.object_for(vs, req[i])
            for i in mechs:
                self._map_mechanism(ctx, vs, req[i])
            reply = await self.member_call(ctx, vs.member, req, vs.helper)
            if reply[0] == OK:
                for j in created:
                    if isinstance(reply[j], int):
                        reply[j] = await ctx.object_from(vs, reply[j], created=True)
                for j in found:
                    if isinstance(reply[j], list):
                        reply[j] = [await ctx.object_from(vs, h, created=False) for h in reply[j]]
            return reply

        forward.__name__ = f"forward_{fn.name}"
        return forward

    @staticmethod
    def _map_mechanism(ctx: ApplicationContext, vs: VirtualSession, mech: Any) -> None:
        if not isinstance(mech, list) or len(mech) != 2:
            return  # the helper answers a malformed mechanism with CKR_ARGUMENTS_BAD
        fields = _MECH_OBJECT_FIELDS.get(mech[0]) if isinstance(mech[0], int) else None
        if fields and isinstance(mech[1], list):
            for k in fields:
                if k < len(mech[1]):
                    mech[1][k] = ctx.object_for(vs, mech[1][k])

    # -- slots ------------------------------------------------------------------------

    def group(self, ctx: ApplicationContext, slot: object) -> Group:
        group = self.daemon.slots.get(slot) if isinstance(slot, int) else None
        if group is None or not self.daemon.allowed(ctx, group):
            raise CKError(CKR_SLOT_ID_INVALID)
        return group

    @staticmethod
    def serving_member(group: Group) -> Member:
        member = group.primary()
        if member is None:
            raise CKError(CKR_TOKEN_NOT_PRESENT if not group.present else CKR_DEVICE_ERROR)
        return member

    async def get_slot_list(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        _, token_present, cap = req
        slots = [g.slot_id for g in self.daemon.groups
                 if self.daemon.allowed(ctx, g) and (not token_present or g.present)]
        if cap is None:
            return [OK, len(slots)]
        if not isinstance(cap, int):
            return [CKR_ARGUMENTS_BAD]
        if cap < len(slots):
            return [CKR_BUFFER_TOO_SMALL, len(slots)]
        return [OK, slots]

    async def get_slot_info(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        group = self.group(ctx, req[1])
        if req[2] is None:
            return [CKR_ARGUMENTS_BAD]
        flags = CKF_TOKEN_PRESENT if group.present else 0
        return [OK, [_pad(f"p11p group {group.label}", 64), _pad("p11p", 32), flags,
                     [0, 1], [0, 1]]]

    async def get_token_info(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        group = self.group(ctx, req[1])
        member = self.serving_member(group)
        reply = await self.member_call(ctx, member, [req[0], member.slot_id, req[2]])
        if reply[0] == OK and isinstance(reply[1], list) and reply[1]:
            reply[1][0] = group.label_bytes
        return reply

    async def forward_slot_call(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        member = self.serving_member(self.group(ctx, req[1]))
        req[1] = member.slot_id
        return await self.member_call(ctx, member, req)

    # -- sessions ---------------------------------------------------------------------

    async def open_session(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        group = self.group(ctx, req[1])
        member = self.serving_member(group)
        helper = await self._helper(ctx, member)
        req[1] = member.slot_id
        reply = await self.member_call(ctx, member, req, helper)
        if reply[0] == OK and isinstance(reply[1], int) and isinstance(req[2], int):
            reply[1] = ctx.add_session(group, req[2], member, helper, reply[1]).handle
        return reply

    async def _helper(self, ctx: ApplicationContext, member: Member) -> Any:
        try:
            return await ctx.helper(member)
        except MemberUnavailable as exc:
            log.error("member failure detected: group=%s member=%s function=helper-start rv=%s %s (%s)",
                      member.group.label, member.name, rv_name(exc.rv), ctx.name, exc)
            raise CKError(CKR_DEVICE_ERROR, str(exc)) from None

    async def close_session(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        vs = ctx.sessions.get(req[1])
        req[1] = vs.real
        try:
            reply = await self.member_call(ctx, vs.member, req, vs.helper)
        except CKError:
            reply = [OK]  # the member session is gone with its helper
        if reply[0] in (OK, CKR["CKR_SESSION_HANDLE_INVALID"], CKR["CKR_SESSION_CLOSED"]):
            ctx.forget_session(vs)
            return [OK]
        return reply

    async def close_all_sessions(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        group = self.group(ctx, req[1])
        sessions = [vs for vs in ctx.sessions.values() if vs.group is group]
        for member in {vs.member for vs in sessions}:
            try:
                await self.member_call(ctx, member, [req[0], member.slot_id])
            except CKError:
                pass
        for vs in sessions:
            ctx.forget_session(vs)
        ctx.logins.pop(group, None)
        return [OK]

    async def get_session_info(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        vs = ctx.sessions.get(req[1])
        req[1] = vs.real
        reply = await self.member_call(ctx, vs.member, req, vs.helper)
        if reply[0] == OK and isinstance(reply[1], list) and reply[1]:
            reply[1][0] = vs.group.slot_id
        return reply

    # -- login ------------------------------------------------------------------------

    async def login(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        vs = ctx.sessions.get(req[1])
        user, pin = req[2], req[3]
        req[1] = vs.real
        reply = await self.member_call(ctx, vs.member, req, vs.helper)
        if reply[0] == OK and isinstance(user, int) and isinstance(pin, bytes):
            ctx.logins[vs.group] = (user, pin)
        return reply

    async def logout(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        vs = ctx.sessions.get(req[1])
        req[1] = vs.real
        reply = await self.member_call(ctx, vs.member, req, vs.helper)
        if reply[0] == OK:
            ctx.logins.pop(vs.group, None)
        return reply

    async def set_pin(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        vs = ctx.sessions.get(req[1])
        new_pin = req[3]
        req[1] = vs.real
        reply = await self.member_call(ctx, vs.member, req, vs.helper)
        login = ctx.logins.get(vs.group)
        if reply[0] == OK and login is not None and isinstance(new_pin, bytes):
            ctx.logins[vs.group] = (login[0], new_pin)
        return reply

    # -- objects ----------------------------------------------------------------------

    async def destroy_object(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        vs = ctx.sessions.get(req[1])
        handle = req[2]
        req[1] = vs.real
        req[2] = ctx.object_for(vs, handle)
        reply = await self.member_call(ctx, vs.member, req, vs.helper)
        if reply[0] == OK:
            ctx.destroyed(handle)
        return reply

    # -- the rest ---------------------------------------------------------------------

    async def finalize(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        await self.daemon.end_context(ctx)
        return [OK]

    async def wait_for_slot_event(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        flags = req[1]
        if not isinstance(flags, int):
            return [CKR_ARGUMENTS_BAD]
        if flags & CKF_DONT_BLOCK:
            try:
                return [OK, ctx.events.get_nowait()]
            except asyncio.QueueEmpty:
                return [CKR["CKR_NO_EVENT"], None]
        event = asyncio.ensure_future(ctx.events.get())
        ended = asyncio.ensure_future(ctx.finalized.wait())
        try:
            await asyncio.wait((event, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not event.done():
                event.cancel()
        if event.done() and not event.cancelled():
            return [OK, event.result()]
        return [CKR["CKR_CRYPTOKI_NOT_INITIALIZED"], None]

    async def not_supported(self, ctx: ApplicationContext, req: list[Any]) -> Reply:
        return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]


__all__ = ["Dispatcher", "CKU_SO"]
