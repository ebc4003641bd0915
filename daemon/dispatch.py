"""The dispatch table: one handler per function code, built from protocol/functions.spec.

Every call that names a session goes to the router (daemon/router.py), which runs it on
a member with failover and replay. Calls that name a slot, open or close sessions, log
in or out, or wait for events have their own handlers here, because the daemon answers
them from (or records them in) the virtual view.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget, hello
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import CKError
from p11p.daemon.gen import requests as R
from p11p.daemon.handles import CLIENT_FIRST, CLIENT_LAST
from p11p.daemon.members import Group, Member
from p11p.daemon.policy import choose_member
from p11p.daemon.search import Searches
from p11p.protocol import spec
from p11p.protocol.constants import CKF, CKR, CKU

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.dispatch")

Reply = list[Any]
Handler = Callable[[ApplicationContext, Any], Awaitable[Reply]]  # (context, typed request)


def _on_frame(handler: Callable[[ApplicationContext, list[Any]], Awaitable[Reply]]) -> Handler:
    """A handler of the request frame itself (the data plane's, in direct.py)."""
    async def on_typed(ctx: ApplicationContext, req: R.Request) -> Reply:
        return await handler(ctx, req.frame)
    return on_typed

OK = CKR["CKR_OK"]
CKR_ARGUMENTS_BAD = CKR["CKR_ARGUMENTS_BAD"]
CKR_SLOT_ID_INVALID = CKR["CKR_SLOT_ID_INVALID"]
CKR_BUFFER_TOO_SMALL = CKR["CKR_BUFFER_TOO_SMALL"]
CKR_WRITE_PROTECTED = CKR["CKR_TOKEN_WRITE_PROTECTED"]
CKR_HOST_MEMORY = CKR["CKR_HOST_MEMORY"]
CKF_TOKEN_PRESENT = CKF["CKF_TOKEN_PRESENT"]
CKF_DONT_BLOCK = CKF["CKF_DONT_BLOCK"]
_CODE = {f.name: f.code for f in spec.functions()}
# Session calls that may create, change or destroy objects: each one ends the validity
# of the group's cached find results (whatever its outcome).
# (C_DestroyObject has its own handler, which does it too.)
_OBJECT_WRITES = frozenset(f.code for f in spec.functions()
                           if f.writes in spec.CREATES or f.writes == "set")
# p11p's own code (protocol/README.md): C_FindObjectsInit with the whole result in the
# reply, [FIND_ALL, session, template] -> [rv, handles or nil]
FIND_ALL = spec.own_codes()["FIND_ALL"].code
CKU_CONTEXT_SPECIFIC = CKU["CKU_CONTEXT_SPECIFIC"]


def _pad(text: str, size: int) -> bytes:
    raw = text.encode()[:size]
    return raw + b" " * (size - len(raw))


class Dispatcher(Searches):
    """Maps a request `[code, arg...]` of one application context to its reply (the
    searches' handlers in search.py)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.router = daemon.router
        self.table: dict[int, Handler] = {}
        direct = daemon.direct
        self.direct_bind = _on_frame(direct.bind)
        self.direct_key = _on_frame(direct.key)
        self.direct_object = _on_frame(direct.object)
        self.direct_unbind = _on_frame(direct.unbind)
        self.direct_adopt = _on_frame(direct.adopt)
        self.direct_adopt_update = _on_frame(direct.adopt_update)
        # functions.spec names the handler of each call the daemon answers itself
        # (@daemon=...); other calls on a session go through the router
        for fn in (*spec.functions(), *spec.own_codes().values()):
            if fn.daemon:
                self.table[fn.code] = getattr(self, fn.daemon)
            elif fn.local:
                self.table[fn.code] = self.not_supported
            elif fn.code > 0 and fn.wire_args and fn.wire_args[0].kind == "session":
                self.table[fn.code] = self.session_call
            elif fn.code > 0:
                raise AssertionError(f"no handler for {fn.name}")
        self.arity = {fn.code: len(fn.wire_args) + 1
                      for fn in (*spec.functions(), *spec.own_codes().values())
                      if fn.code in self.table}

    async def dispatch(self, ctx: ApplicationContext, request: list[Any]) -> Reply:
        code = request[0]
        handler = self.table.get(code) if isinstance(code, int) else None
        if handler is None:
            return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
        if len(request) != self.arity[code]:
            return [CKR_ARGUMENTS_BAD]
        if ctx.closed:
            return [CKR["CKR_CRYPTOKI_NOT_INITIALIZED"]]
        if ctx.over_limit is not None:
            return [CKR_HOST_MEMORY]
        limits = self.daemon.config
        if ctx.in_flight >= limits.max_calls_per_app and code != _CODE["C_Finalize"]:
            self.limit(ctx, "max_calls_per_app", limits.max_calls_per_app)
            return [CKR_HOST_MEMORY]
        ctx.in_flight += 1
        deadline = budget.begin()  # one deadline per application call (budget.py)
        try:
            return await handler(ctx, R.decode(request))  # the types checked (admit)
        except CKError as exc:
            if exc.args and str(exc) != "":
                fn = spec.by_code().get(code)
                log.debug("%s %s: %s", ctx.name, fn.name if fn else code, exc)
            return [exc.rv]
        finally:
            ctx.in_flight -= 1
            budget.end(deadline)

    @staticmethod
    def limit(ctx: ApplicationContext, name: str, value: int) -> None:
        """One log line per application and limit."""
        if name not in ctx.limit_logged:
            ctx.limit_logged.add(name)
            log.warning("limit reached: %s uid=%d: %s = %d", ctx.name, ctx.uid, name, value)

    async def session_call(self, ctx: ApplicationContext, req: R.Request) -> Reply:
        vs = ctx.sessions.get(req.frame[1])
        if req.CODE in _OBJECT_WRITES:
            try:
                return await self.router.call(ctx, vs, req.frame)
            finally:
                vs.group.objects_changed()
        return await self.router.call(ctx, vs, req.frame)

    # -- slots ------------------------------------------------------------------------

    def group(self, ctx: ApplicationContext, slot: object) -> Group:
        group = self.daemon.slots.get(slot) if isinstance(slot, int) else None
        if group is not None and not self.daemon.allowed(ctx, group):
            log.warning("access refused: uid=%d pid=%d slot=%s", ctx.uid, ctx.pid, slot)
            group = None
        if group is None:
            raise CKError(CKR_SLOT_ID_INVALID)
        return group

    async def get_slot_list(self, ctx: ApplicationContext, req: R.C_GetSlotList) -> Reply:
        cap = req.slot_list
        slots = [g.slot_id for g in self.daemon.groups
                 if self.daemon.allowed(ctx, g) and (not req.token_present or g.present)]
        if cap is None:
            return [OK, len(slots)]
        if cap < len(slots):
            return [CKR_BUFFER_TOO_SMALL, len(slots)]
        return [OK, slots]

    async def get_slot_info(self, ctx: ApplicationContext, req: R.C_GetSlotInfo) -> Reply:
        group = self.group(ctx, req.slot_id)
        if req.info is None:
            return [CKR_ARGUMENTS_BAD]
        flags = CKF_TOKEN_PRESENT if group.present else 0
        return [OK, [_pad(f"p11p group {group.label}", 64), _pad("p11p", 32), flags,
                     [0, 1], [0, 1]]]

    async def get_token_info(self, ctx: ApplicationContext, req: R.C_GetTokenInfo) -> Reply:
        group = self.group(ctx, req.slot_id)
        if not group.present:
            return [CKR["CKR_TOKEN_NOT_PRESENT"]]
        _, reply = await self.router.group_call(ctx, group, req.frame)
        if reply[0] == OK and isinstance(reply[1], list) and len(reply[1]) > 3:
            reply[1][0] = group.label_bytes
            if len(group.members) > 1:  # one serial for the group, whichever member answers
                serial = hashlib.sha256(group.label.encode()).hexdigest()[:16].encode()
                reply[1][3] = serial
        return reply

    async def slot_call(self, ctx: ApplicationContext, req: R.Request) -> Reply:
        group = self.group(ctx, req.frame[1])
        if not group.present:
            return [CKR["CKR_TOKEN_NOT_PRESENT"]]
        _, reply = await self.router.group_call(ctx, group, req.frame)
        return reply

    async def mechanism_call(self, ctx: ApplicationContext, req: R.Request) -> Reply:
        """C_GetMechanismList/Info, answered from what the serving member said before."""
        group = self.group(ctx, req.frame[1])
        if not group.present:
            return [CKR["CKR_TOKEN_NOT_PRESENT"]]
        key = tuple(req.frame[:1] + req.frame[2:])  # the types are checked (gen/requests.py)
        serving = choose_member(group.members, "failover", None, True)
        if isinstance(serving, Member):
            known = serving.mechanism_answers.get(key)
            if known is not None:
                return known
        member, reply = await self.router.group_call(ctx, group, req.frame)
        if reply[0] == OK:
            member.mechanism_answers[key] = reply
        return reply

    async def init_token(self, ctx: ApplicationContext, req: R.C_InitToken) -> Reply:
        group = self.group(ctx, req.slot_id)
        if len(group.members) > 1:
            return [CKR_WRITE_PROTECTED]  # a PIN or token write on one member only
        member = group.members[0]
        if member.config.token is not None and req.label is not None:
            # the member keeps the label its configuration finds it by (applications see
            # the group's label anyway)
            req = R.C_InitToken([*req.frame[:3], member.token_label], req.slot_id, req.pin,
                                member.token_label)
            log.info("%s C_InitToken: group=%s member=%s keeps its label %r", ctx.name,
                     group.label, member.name, member.config.token)
        try:
            return await self.slot_call(ctx, req)
        finally:
            group.objects_changed()

    # -- sessions ---------------------------------------------------------------------

    async def open_session(self, ctx: ApplicationContext, req: R.C_OpenSession) -> Reply:
        group = self.group(ctx, req.slot_id)
        flags = req.flags
        if req.session is None:
            # let the module answer a NULL handle pointer itself
            _, reply = await self.router.group_call(ctx, group, req.frame)
            return reply
        refused = self.unopenable(ctx, flags)
        if refused is not None:
            return [refused, None]
        vs = await self.router.bind.open_session(ctx, group, flags)
        return [OK, vs.handle]

    def unopenable(self, ctx: ApplicationContext, flags: int) -> int | None:
        """Why a new session of the application cannot be opened (a CK_RV), or None."""
        if not flags & CKF["CKF_SERIAL_SESSION"]:
            return CKR["CKR_SESSION_PARALLEL_NOT_SUPPORTED"]
        if len(ctx.sessions) >= self.daemon.config.max_sessions_per_app:
            self.limit(ctx, "max_sessions_per_app", self.daemon.config.max_sessions_per_app)
            return CKR["CKR_SESSION_COUNT"]
        return None

    async def open_at(self, ctx: ApplicationContext, req: R.OPEN_AT) -> Reply:
        """The first call that travels on a session the client library opened itself
        (feature client_open): the session is opened here under the handle the library
        gave it, on a member at once (`now`), or only made known. Again for a session
        already open with that slot and flags: CKR_OK (two threads' first calls on one
        session; or a first call that the library gave up and sent again, while the
        daemon was still opening it)."""
        if "client_open" not in hello.AGREED.get():
            return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
        group = self.group(ctx, req.slot_id)
        if not CLIENT_FIRST <= req.session <= CLIENT_LAST:
            return [CKR_ARGUMENTS_BAD]
        opening = ctx.opening.get(req.session)
        if opening is not None:  # its first call on another connection, maybe given up
            await asyncio.shield(opening)
        known = ctx.sessions.find(req.session)
        if known is not None:
            return [OK if known.group is group and known.flags == req.flags
                    else CKR_ARGUMENTS_BAD]
        refused = self.unopenable(ctx, req.flags)
        if refused is not None:
            return [refused]
        if not req.now:
            # only made known (the application's other sessions close: this one keeps
            # its login); its first call places it and opens its member session
            ctx.add_session(group, req.flags, req.session)
            group.client_opens += 1
            return [OK]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ctx.opening[req.session] = done
        try:
            await self.router.bind.open_session(ctx, group, req.flags, req.session)
        finally:
            del ctx.opening[req.session]
            done.set_result(None)
        group.client_opens += 1
        return [OK]

    async def close_session(self, ctx: ApplicationContext, req: R.C_CloseSession) -> Reply:
        vs = ctx.sessions.get(req.session)
        try:
            await self.router.bind.close_session(ctx, vs)
        finally:
            vs.group.objects_changed()  # the session objects it made are gone
        return [OK]

    async def close_all_sessions(self, ctx: ApplicationContext, req: R.C_CloseAllSessions) -> Reply:
        group = self.group(ctx, req.slot_id)
        try:
            for vs in [vs for vs in ctx.sessions.values() if vs.group is group]:
                await self.router.bind.close_session(ctx, vs)
        finally:
            group.objects_changed()
        return [OK]

    async def get_session_info(self, ctx: ApplicationContext, req: R.C_GetSessionInfo) -> Reply:
        vs = ctx.sessions.get(req.session)
        reply = await self.router.call(ctx, vs, req.frame)
        if reply[0] == OK and isinstance(reply[1], list) and reply[1]:
            reply[1][0] = vs.group.slot_id
        return reply

    # -- login ------------------------------------------------------------------------

    async def login(self, ctx: ApplicationContext, req: R.C_Login) -> Reply:
        vs = ctx.sessions.get(req.session)
        login = ctx.logins.get(vs.group)
        if login is not None and req.user_type != CKU_CONTEXT_SPECIFIC:
            # the application is logged in to the token (the virtual token's state: a
            # member session may be fresh and not yet logged in)
            reply = [CKR["CKR_USER_ALREADY_LOGGED_IN"] if login[0] == req.user_type
                     else CKR["CKR_USER_ANOTHER_ALREADY_LOGGED_IN"]]
            self.daemon.audit.login(ctx, vs.group, req.user_type, reply[0])
            return reply
        failures = self.router.failures
        reply = await failures.login_unfit(ctx, vs, req.frame,
                                           await self.router.call(ctx, vs, req.frame))
        if req.user_type != CKU_CONTEXT_SPECIFIC:  # p11p knows it is logged out
            reply = await failures.stale_login(ctx, vs, req.frame, reply)
        self.daemon.audit.login(ctx, vs.group, req.user_type, reply[0])  # never the PIN
        if reply[0] == OK and isinstance(req.pin, bytes) \
                and req.user_type != CKU_CONTEXT_SPECIFIC:  # that one is an operation's
            ctx.logins[vs.group] = (req.user_type, req.pin)
            if vs.member is not None:
                ctx.logged_in.add(vs.member)
            # the application's other member sessions are logged in too, as all its
            # sessions on a token are (invariant 1): a session that stays on another
            # member (an operation running there) must not see itself logged out
            await self.router.bind.login_everywhere(ctx, vs.group)
            self.daemon.standby.logged_in(ctx, vs.group)  # and on the rest, in the background
            self.daemon.sync.logged_in(vs.group)  # members back while nobody was logged in
        return reply

    async def logout(self, ctx: ApplicationContext, req: R.C_Logout) -> Reply:
        vs = ctx.sessions.get(req.session)
        reply = await self.router.call(ctx, vs, req.frame)
        self.daemon.audit.logout(ctx, vs.group, reply[0])
        if reply[0] == OK:
            ctx.logins.pop(vs.group, None)
            ctx.forget_objects(vs.group, private_only=True)  # as the token's handles end
            await self.daemon.standby.settle(ctx, vs.group)
            for member in vs.group.members:
                if member is not vs.member and member in ctx.logged_in:
                    real = next((s.real[member] for s in ctx.sessions.values()
                                 if member in s.real), ctx.utility.get(member))
                    if real is not None:
                        await self.router.bind.log_out_on(ctx, member, real)
                ctx.logged_in.discard(member)
        return reply

    async def pin_write(self, ctx: ApplicationContext, req: R.C_InitPIN | R.C_SetPIN) -> Reply:
        vs = ctx.sessions.get(req.session)
        if len(vs.group.members) > 1:
            return [CKR_WRITE_PROTECTED]  # a PIN on one member only would break failover
        reply = await self.router.call(ctx, vs, req.frame)
        login = ctx.logins.get(vs.group)
        if reply[0] == OK and isinstance(req, R.C_SetPIN) and login is not None \
                and isinstance(req.new_pin, bytes):
            ctx.logins[vs.group] = (login[0], req.new_pin)
        return reply

    # -- objects ----------------------------------------------------------------------

    async def destroy_object(self, ctx: ApplicationContext, req: R.C_DestroyObject) -> Reply:
        vs = ctx.sessions.get(req.session)
        vobj = ctx.objects.get(req.object)
        if vobj.lost:  # a session object that could not be remade: nowhere to destroy
            ctx.forget_object(vobj)
            return [OK]
        copies = dict(vobj.real) if vobj.is_token is False else {}
        try:
            reply = await self.router.call(ctx, vs, req.frame)
        finally:
            vs.group.objects_changed()
        if reply[0] == OK:
            self.daemon.audit.destroyed(ctx, vs.group, vobj, vs.member)  # before its handles go
            if vobj.is_token and vobj.identity is not None:
                if vs.group.homes.pop(vobj.identity, None) is not None or vobj.home is not None:
                    vs.group.destroyed.add(vobj.identity)
                    vs.group.written += 1
            ctx.forget_object(vobj)
            if copies:
                await self.router.resolve.drop_copies(ctx, vs, copies, vs.member)
        return reply

    # -- the rest ---------------------------------------------------------------------

    async def finalize(self, ctx: ApplicationContext, req: R.Request) -> Reply:
        await self.daemon.end_context(ctx)
        return [OK]

    async def wait_for_slot_event(self, ctx: ApplicationContext, req: R.C_WaitForSlotEvent) -> Reply:
        if req.flags & CKF_DONT_BLOCK:
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

    async def not_supported(self, ctx: ApplicationContext, req: R.Request) -> Reply:
        return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
