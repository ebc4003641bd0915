"""The bind stage: the virtual session on a member, ready for its call: the member
session opened, the application logged in (invariant 1: on every member session that
serves it; a member's login ends with the application's last member session there),
and what the session had elsewhere replayed: session objects from their recipes, the
active operations with their updates, an open find. What cannot be rebuilt is marked
lost, logged once, and answers CKR_DEVICE_ERROR where it is used.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import TOKEN_UNFIT, CKError, MemberUnavailable
from p11p.daemon.helperproc import CallTimedOut
from p11p.daemon.members import Group, Member, MemberState
from p11p.daemon.policy import Operation
from p11p.daemon.shapes import (
    ALREADY_LOGGED_IN,
    CODE,
    DEVICE_ERROR,
    OK,
    SESSION_CLOSED,
    SESSION_HANDLE_INVALID,
    SHAPES,
    USER_NOT_LOGGED_IN,
    KeyMissing,
    Reply,
    SessionVanished,
    digest,
    member_session,
)
from p11p.daemon.virtual import FindState, VirtualSession
from p11p.protocol.constants import CKR, rv_name

if TYPE_CHECKING:
    from p11p.daemon.router import Router

log = logging.getLogger("p11p.ha")
# The call that ends each kind of operation, with arguments that make it end there
# (room for any output; a signature that cannot verify)
# What ends an operation a member session keeps: an empty update (a module ends a
# single-part operation there, as SoftHSM2 does; its final would not) and the final. A
# decryption gets one block of zeros before its final: SoftHSM2 2.6 answers an empty
# update and the final of a CBC-PAD decryption that had no data CKR_BUFFER_TOO_SMALL
# (it asks for 2^64 - 16 bytes) and keeps the operation; after whole blocks (64 bytes:
# of 8 and of 16), the final fails and ends it (as client/plane_move.c's ENDS)
STALE_ENDS: dict[str, list[list[Any]]] = {
    "encrypt": [[CODE["C_EncryptUpdate"], b"", 1 << 16], [CODE["C_EncryptFinal"], 1 << 16]],
    "decrypt": [[CODE["C_DecryptUpdate"], b"", 1 << 16], [CODE["C_DecryptUpdate"], bytes(64), 1 << 16],
                [CODE["C_DecryptFinal"], 1 << 16]],
    "digest": [[CODE["C_DigestUpdate"], b""], [CODE["C_DigestFinal"], 1 << 16]],
    "sign": [[CODE["C_SignUpdate"], b""], [CODE["C_SignFinal"], 1 << 16]],
    "verify": [[CODE["C_VerifyUpdate"], b""], [CODE["C_VerifyFinal"], bytes(64)]],
    "find": [[CODE["C_FindObjectsFinal"]]]}
# CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS, CKS_RW_SO_FUNCTIONS
LOGGED_IN_STATES = frozenset({1, 3, 4})


class SessionBuilder:
    def __init__(self, router: Router) -> None:
        self.r = router

    async def session_on(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> int:
        real = vs.real.get(member)
        if real is None:
            real = await self._open(ctx, member, vs.flags, f"re-opening the session on {member.name}")
            vs.real[member] = real
            if vs.left is not None and vs.left.member is member:
                vs.left = None  # another member session: what ran in the old one is gone
            if vs.member is member:
                # its own member session was lost (a helper replaced), and this one is
                # opened for a call that does not prepare (a token write): what the lost
                # one held is replayed at the session's next prepare, not taken as there
                vs.bare.add(member)
            await self.check_login(ctx, member, real)
        try:
            await self.login_on(ctx, vs.group, member, real)
        except SessionVanished:
            if vs.real.get(member) == real:
                del vs.real[member]
                # a module that answered so without closing it would keep it, and the
                # application logged in there after its last session closed
                await self._close(ctx, member, real)
            raise
        return real

    async def check_login(self, ctx: ApplicationContext, member: Member, real: int) -> None:
        """A member session just opened where the application is believed logged in: the
        module may have lost its login since (an HSM reset closes every session, and the
        daemon hears of it only when an old session is used). Its state says; a lost
        login is a reset: the application's other sessions there, and the session objects
        they held, went with it. They are rebuilt as after a session-lost code (the
        objects made again, the handles looked up again), logged in again, and the call
        tried again (SessionVanished)."""
        if member not in ctx.logged_in:
            return
        reply = await self.r.link.checked(ctx, member, [CODE["C_GetSessionInfo"], real, 0])
        info = reply[1] if reply[0] == OK and len(reply) > 1 else None
        if isinstance(info, list) and len(info) > 1 and info[1] not in LOGGED_IN_STATES:
            log.warning("login lost: %s member=%s: the module no longer has the application "
                        "logged in (a reset?); its sessions there are rebuilt and logged in "
                        "again", ctx.name, member.name)
            await self.r.failures.reset_member(ctx, member)
            raise SessionVanished

    async def login_on(self, ctx: ApplicationContext, group: Group, member: Member, real: int) -> None:
        login = ctx.logins.get(group)
        if login is None or member in ctx.logged_in:
            return
        reply = await self.r.link.checked(ctx, member, [CODE["C_Login"], real, login[0], login[1]])
        if reply[0] in (SESSION_HANDLE_INVALID, SESSION_CLOSED):
            raise SessionVanished
        if reply[0] in TOKEN_UNFIT:
            # a PIN another member took, refused for the token's own state (its store lost
            # the user PIN, say): the member cannot serve logged-in work; it fails, and the
            # call goes to another member (or is held for one)
            raise MemberUnavailable(member.name, f"C_Login returned {rv_name(reply[0])}",
                                    reply[0], function="C_Login")
        if reply[0] == USER_NOT_LOGGED_IN:
            # no answer to a C_Login (§5.6): the module's state is off, as after a reset;
            # the application's sessions there are rebuilt, and the call placed again
            log.warning("%s member=%s: C_Login returned %s; its sessions there are rebuilt",
                        ctx.name, member.name, rv_name(reply[0]))
            await self.r.failures.reset_member(ctx, member)
            raise SessionVanished
        if reply[0] not in (OK, ALREADY_LOGGED_IN):
            log.error("session potentially not recoverable: %s member=%s: login failed with %s",
                      ctx.name, member.name, rv_name(reply[0]))
            raise CKError(DEVICE_ERROR, "login on another member failed")
        ctx.logged_in.add(member)

    async def log_out_on(self, ctx: ApplicationContext, member: Member, real: int) -> None:
        """C_Logout on the application's member session `real` on `member`, where the
        application is logged out now. A module that does not say it is logged out may
        keep the login (a failing member answers anything): the application's helper
        there goes, and the login with it; its sessions there open again where used
        next."""
        ctx.logged_in.discard(member)
        try:
            reply = await self.r.link.raw(ctx, member, [CODE["C_Logout"], real])
        except Exception:  # noqa: BLE001 - a failing member, a call out of time: not known
            reply = None
        if reply is not None and reply[0] in (OK, USER_NOT_LOGGED_IN):
            return
        log.info("%s logout on %s returned %s: its helper is replaced", ctx.name, member.name,
                 "nothing" if reply is None else rv_name(reply[0]))
        ctx.forget_member(member, gently=True)

    async def login_everywhere(self, ctx: ApplicationContext, group: Group) -> None:
        """Logs the application in on every member where it has member sessions and is
        not logged in yet (after its C_Login on one of them)."""
        for member in group.members:
            if member in ctx.logged_in or not member.health.usable:
                continue
            real = next((vs.real[member] for vs in ctx.sessions.values()
                         if vs.group is group and member in vs.real), ctx.utility.get(member))
            if real is None:
                continue
            try:
                await self.login_on(ctx, group, member, real)
            except MemberUnavailable as exc:
                self.r.failures.member_failed(member, exc, "C_Login")
            except CKError as exc:  # it is logged in when it next serves, or the error shows then
                log.info("%s member=%s: login after the application's failed: %s", ctx.name,
                         member.name, exc)

    async def _open(self, ctx: ApplicationContext, member: Member, flags: int, why: str) -> int:
        """C_OpenSession on `member`: the member session's handle."""
        reply = await self.r.link.checked(ctx, member, [CODE["C_OpenSession"], member.slot_id,
                                                        flags, 0])
        if reply[0] in (SESSION_HANDLE_INVALID, SESSION_CLOSED):
            raise SessionVanished  # the member lost its sessions meanwhile: again
        if reply[0] == USER_NOT_LOGGED_IN:
            # not a C_OpenSession answer (PKCS#11 §5.6 lists none such): the member lost
            # the application's login, or its state is off; its sessions there are reset,
            # again (a module that keeps answering it: CKR_DEVICE_ERROR). Also for p11p's
            # own session (a search of the application's objects held there opens it)
            log.warning("login lost: %s member=%s C_OpenSession returned %s; new "
                        "session and login", ctx.name, member.name, rv_name(reply[0]))
            await self.r.failures.reset_member(ctx, member)
            raise SessionVanished
        if reply[0] != OK:
            raise CKError(reply[0], why)
        return int(reply[1])

    async def utility_session(self, ctx: ApplicationContext, member: Member) -> int:
        real = ctx.utility.get(member)
        if real is None:
            real = ctx.utility[member] = await self._open(ctx, member, 4, "")  # CKF_SERIAL_SESSION
            await self.check_login(ctx, member, real)
        group = member.group
        try:
            await self.login_on(ctx, group, member, real)
        except SessionVanished:
            if ctx.utility.get(member) == real:
                del ctx.utility[member]
                await self._close(ctx, member, real)  # as in session_on
            raise
        return real

    async def prepare(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> None:
        """The session on `member`, with everything it had elsewhere replayed."""
        # The state is there only if the session's member session survived: a member
        # that failed and recovered, or lost our sessions, needs the replay too.
        present = vs.member is member and member in vs.real and member not in vs.bare
        await self.session_on(ctx, vs, member)
        if present:
            return
        vs.bare.discard(member)  # replayed below
        old = vs.member
        bound = vs.direct is not None
        if bound:
            await self.r.daemon.direct.revoke(vs)  # it moves, or its member session was lost
        # the member session of a binding the daemon ended may still run operations the
        # client ran on the data plane and has not handed over: as for a bound one, they
        # end there when the session leaves it (the client sends them again)
        left = vs.left
        bound = bound or (left is not None and old is left.member
                          and vs.real.get(old) == left.real)
        # what runs in the member session it leaves (when that one stays) must end there:
        # it goes on here, and a later call back there would meet it (OPERATION_ACTIVE)
        stale = [*vs.ops] + (["find"] if vs.find is not None and not vs.find.cached else [])
        lost: list[str] = []
        replayed: list[str] = []
        for vobj in list(vs.objects):
            if member not in vobj.real and not vobj.lost:
                try:
                    await self.r.resolve.ensure_object(ctx, vs, vobj, member)
                    replayed.append("object")
                except (SessionVanished, budget.CallExpired):
                    raise  # not the object's fault: the call is placed again, or ends
                except (CKError, KeyMissing) as exc:
                    if isinstance(exc, KeyMissing) and vobj.held():
                        # made at random, or of a token object only another member holds:
                        # it stays on its member, and calls that need it go there
                        continue
                    vobj.lost = str(exc) or "its source is on no member"
                    lost.append(f"session object {vobj.handle}: {vobj.lost}")
        for kind, op in list(vs.ops.items()):
            why = op.why if not op.replayable else await self.replay_operation(ctx, vs, member, op)
            if why:
                lost.append(f"{kind} operation: {why}")
                del vs.ops[kind]
                vs.lost[kind] = why
            else:
                replayed.append(f"{kind}+{len(op.updates)} updates")
        if vs.find is not None and not vs.find.cached:
            await self.replay_find(ctx, vs, member, vs.find)
            replayed.append(f"find ({len(vs.find.returned)} already returned)")
        vs.member = member
        if old is not member:
            vs.left = None
        if old is not None and old is not member and old.health.state is MemberState.DRAINING:
            await self.close_on(ctx, vs, old)
        elif old is not None and old is not member and old in vs.real and (stale or bound):
            # a bound session's member session may also hold operations of the data
            # plane, of any kind (its client sends them again through the daemon here)
            await self.end_stale(ctx, old, vs.real[old], list(STALE_ENDS) if bound else stale)
        if old is member:
            vs.group.metrics.replays += 1
            log.warning("session rebuilt: %s on %s (replayed: %s)", vs.describe(), member.name,
                        ", ".join(replayed) or "nothing")
        elif old is not None and (not old.health.usable or replayed):
            vs.group.metrics.failovers += 1
            vs.group.metrics.replays += 1 if replayed else 0
            log.warning("session failed over: %s from %s to %s (replayed: %s)",
                        vs.describe(), old.name, member.name, ", ".join(replayed) or "nothing")
        if lost:
            # once: what was lost answers CKR_DEVICE_ERROR where it is used next
            log.error("session potentially not recoverable: %s on %s: %s", vs.describe(),
                      member.name, "; ".join(lost))

    async def end_stale(self, ctx: ApplicationContext, member: Member, real: int,
                        kinds: list[str]) -> None:
        """Ends the operations (and search) of a member session its virtual session left
        (PKCS#11 §5.2: a final ends an operation whatever it answers). Best effort: a
        member that fails here is left to its next call."""
        for kind in kinds:
            for request in STALE_ENDS.get(kind, []):
                try:
                    await self.r.link.raw(ctx, member, [request[0], real, *request[1:]])
                except (MemberUnavailable, budget.CallExpired):
                    return

    async def replay_operation(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                               op: Operation) -> str:
        """Replays an operation's init and updates; returns why it failed, or ''. A
        session key the application destroyed since is made again for the init (from
        its recipe, as a copy's destroyed source is) and goes after it."""
        try:
            try:
                init = await self.r.resolve.translate(ctx, vs, member, SHAPES[op.init[0]],
                                                      op.init, op.keys)
            except (SessionVanished, budget.CallExpired):
                raise
            except (CKError, KeyMissing) as exc:  # its key is lost, or on no member
                return f"its key: {str(exc) or 'on no member'}"
            reply = await self.r.link.replayed(ctx, member, init)
        finally:
            await self.r.resolve.drop_remade(ctx, vs, member, op.keys.values())
        if reply[0] != OK:
            return f"init returned {rv_name(reply[0])}"
        for ureq, expected in op.updates:
            reply = await self.r.link.replayed(ctx, member, await self.r.resolve.translate(
                ctx, vs, member, SHAPES[ureq[0]], ureq))
            if reply[0] != OK:
                return f"update returned {rv_name(reply[0])}"
            if expected is not None and digest(reply[1]) != expected:
                return "a replayed update gave a different output"
        return ""

    @staticmethod
    def pending_batch(vs: VirtualSession, vreq: list[Any]) -> Reply:
        """C_FindObjects answered from a replayed find's remaining results."""
        find = vs.find
        assert find is not None and find.pending is not None
        if not isinstance(vreq[2], int):
            return [CKR["CKR_ARGUMENTS_BAD"]]
        batch, find.pending = find.pending[:vreq[2]], find.pending[vreq[2]:]
        find.returned += batch
        return [OK, batch]

    async def replay_find(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                          find: FindState) -> None:
        real = member_session(vs.real, member)
        # a member that loses the session meanwhile is reset, and the call placed again
        reply = await self.r.link.replayed(ctx, member, [CODE["C_FindObjectsInit"], real,
                                                         find.template])
        if reply[0] != OK:
            raise CKError(reply[0], "replaying a find")
        found: list[int] = []
        while True:
            reply = await self.r.link.replayed(ctx, member, [CODE["C_FindObjects"], real, 256])
            if reply[0] != OK:
                raise CKError(reply[0], "replaying a find")
            if not reply[1]:
                break
            for h in reply[1]:
                found.append((await self.r.resolve.object_from(ctx, vs, member, h, created=False)).handle)
        done = set(find.returned)
        find.pending = [h for h in found if h not in done]

    async def leave(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> None:
        """A movable session leaves `member` (drain): it is placed anew at its next call."""
        await self.close_on(ctx, vs, member)
        if vs.member is member:
            vs.member = None

    @staticmethod
    def rebuildable(vs: VirtualSession, settled: bool = False) -> bool:
        """Whether the session's member session can be closed at will: what it holds (its
        session objects, operations, search) can all be made again elsewhere. A member
        session that holds more is closed only when the member lost it anyway. A bound
        one may hold operations of the data plane the daemon never saw (whether the
        client can replay them, only the client knows): not at will either, unless
        `settled`: the client handed them over just before the call (a search,
        client/find.c), and those it could not it sends again itself. Nor one whose
        objects or operations' keys come from a random key another session's object
        still holds on a member in service (VirtualObject.pinned): made again elsewhere
        they would be another key than that one, so they stay on their member. Nor one
        holding a session object made from what one member holds (a token object written
        there, VirtualObject.source_homes): closed, it could be made on that member only."""
        return ((vs.direct is None or settled) and vs.find is None
                and all(op.replayable for op in vs.ops.values())
                and all(o.lost or (o.replayable and not o.pinned(vs)
                                   and o.source_homes() is None) for o in vs.objects)
                and not any(k.is_token is False and k.owner is not vs
                            and (k.random_held() or k.pinned(vs))
                            for op in vs.ops.values() for k in op.keys.values()))

    async def close_on(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> None:
        """Closes the session's member session on `member`; the next use opens another."""
        if vs.direct is not None and vs.direct.member is member:
            await self.r.daemon.direct.revoke(vs)
        real = vs.real.pop(member, None)
        if real is None:
            return
        for vobj in vs.objects:  # its session objects end with the member session
            ctx.unregister(vobj, member)
        if ctx.has_helper(member):
            await self._close(ctx, member, real)
            self.closed_on(ctx, member)

    async def _close(self, ctx: ApplicationContext, member: Member, real: int) -> None:
        """C_CloseSession of a member session. A member-failed answer fails the member:
        the session (and the login it holds) must not stay behind in its module."""
        try:
            for _ in range(2):
                reply = await self.r.link.checked(ctx, member, [CODE["C_CloseSession"], real])
                if reply[0] in (OK, SESSION_HANDLE_INVALID):
                    return
            # refused twice: the session, its login and its objects would stay in the
            # module (a search would find them, the next session be logged in): the
            # context's helper goes, and the module's state with it
            log.warning("%s member=%s C_CloseSession returned %s: the helper is replaced",
                        ctx.name, member.name, rv_name(reply[0]))
            ctx.forget_member(member)
        except MemberUnavailable as exc:
            self.r.failures.member_failed(member, exc, "C_CloseSession")
        except budget.CallExpired:
            pass  # no time was left: the session goes with the context's helper

    async def close_utility(self, ctx: ApplicationContext, member: Member) -> None:
        """Closes p11p's own member session of this context on `member`, if any."""
        real = ctx.utility.pop(member, None)
        if real is not None and ctx.has_helper(member):
            await self._close(ctx, member, real)
            self.closed_on(ctx, member)

    @staticmethod
    def closed_on(ctx: ApplicationContext, member: Member) -> None:
        """A member session of `ctx` on `member` was closed: when it was the last one,
        the module has logged the application out there (PKCS#11 §5.6), and the next
        member session there logs in again; and its object handles there may have
        ended with it (SoftHSM2 drops every handle of the slot): token objects are
        looked up again by identity, session objects went with their sessions."""
        if ctx.sessions_on(member) == 0:
            ctx.logged_in.discard(member)
            for vobj in [v for (m, _), v in ctx.by_real.items() if m is member]:
                ctx.unregister(vobj, member)

    async def open_session(self, ctx: ApplicationContext, group: Group, flags: int,
                           handle: int | None = None) -> VirtualSession:
        vs = ctx.add_session(group, flags, handle)
        try:
            await self.call_prepare(ctx, vs)
        except BaseException:
            ctx.forget_session(vs)
            raise
        return vs

    async def call_prepare(self, ctx: ApplicationContext, vs: VirtualSession) -> None:
        """Places a new session on a member and opens it there (with failover)."""
        tries = 0
        limit = 2 * len(vs.group.members) + 2
        shape = SHAPES[CODE["C_OpenSession"]]
        while True:
            tries += 1
            member = await self.r.place.place(ctx, vs, shape, [], None)
            try:
                await self.prepare(ctx, vs, member)
                return
            except MemberUnavailable as exc:
                self.r.failures.member_failed(member, exc, "C_OpenSession")
                if isinstance(exc, CallTimedOut):
                    budget.current().member_timed_out(vs.group)
                if tries >= limit:
                    raise CKError(DEVICE_ERROR) from None
            except SessionVanished:
                if tries >= limit:
                    raise

    async def close_session(self, ctx: ApplicationContext, vs: VirtualSession) -> None:
        for member in list(vs.real):
            await self.close_on(ctx, vs, member)
        ctx.forget_session(vs)
        if not any(s.group is vs.group for s in ctx.sessions.values()):
            # the application's last session on the token: p11p's own member sessions
            # go too, or they would keep it logged in there (§5.6)
            for member in vs.group.members:
                await self.close_utility(ctx, member)
                await self.close_all(ctx, member)

    async def close_all(self, ctx: ApplicationContext, member: Member) -> None:
        """C_CloseAllSessions on the context's helper of `member` (its sessions there are
        all closed in p11p's view): a session the module kept while it answered its
        close otherwise (CKR_SESSION_HANDLE_INVALID from a module that had not lost it)
        would keep the application logged in after its last session."""
        if not ctx.has_helper(member) or member.slot_id is None:
            return
        try:
            reply = await self.r.link.raw(ctx, member, [CODE["C_CloseAllSessions"],
                                                        member.slot_id])
            if reply[0] != OK:
                log.warning("%s member=%s C_CloseAllSessions returned %s: the helper is "
                            "replaced", ctx.name, member.name, rv_name(reply[0]))
                ctx.forget_member(member)
        except MemberUnavailable as exc:
            self.r.failures.member_failed(member, exc, "C_CloseAllSessions")
        except budget.CallExpired:
            ctx.forget_member(member)  # no time was left: the helper goes, and its sessions
