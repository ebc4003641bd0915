"""The resolve stage: virtual object handles to a member's. Unknown handles get the code
of their role; token objects are found by identity on each member (and remembered),
session objects made again from their recipes; an object a member no longer has is
looked up again without touching the member's other sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import CKError, MemberUnavailable
from p11p.daemon.members import Member
from p11p.daemon.policy import INIT, operation_kind
from p11p.daemon.shapes import (
    CODE,
    DEVICE_ERROR,
    MECH_OBJECT_FIELDS,
    OBJECT_HANDLE_INVALID,
    OK,
    SESSION_CLOSED,
    SESSION_HANDLE_INVALID,
    SHAPES,
    CallShape,
    KeyMissing,
    SessionVanished,
    member_session,
)
from p11p.daemon.virtual import (
    CKA_CLASS,
    IDENTITY_TEMPLATE,
    VirtualObject,
    VirtualSession,
    identity_from_values,
    private_from_values,
)
from p11p.protocol.constants import CKR, rv_name

if TYPE_CHECKING:
    from p11p.daemon.router import Router

log = logging.getLogger("p11p.ha")
OPERATION_ACTIVE = CKR["CKR_OPERATION_ACTIVE"]
# Replies to C_GetAttributeValue that carry the values (those that exist and may be read:
# §5.7.5): the identity read is done. Another is a refusal, which may pass.
VALUES_READ = frozenset({OK, *(CKR[n] for n in ("CKR_ATTRIBUTE_TYPE_INVALID",
                                                "CKR_ATTRIBUTE_SENSITIVE",
                                                "CKR_BUFFER_TOO_SMALL"))})
OPERATION_NOT_INITIALIZED = CKR["CKR_OPERATION_NOT_INITIALIZED"]


class HandleResolver:
    def __init__(self, router: Router) -> None:
        self.r = router

    def lookup(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
               vreq: list[Any]) -> None:
        """The call's object handles exist (else the CK_RV of their role), none of them
        is a lost session object, and the call does not continue a lost operation."""
        for i, invalid in zip(shape.objects, shape.object_rvs, strict=True):
            vobj = ctx.objects.find(vreq[i]) if isinstance(vreq[i], int) else None
            if vobj is None:
                self.session_state_first(vs, shape)
                raise CKError(invalid)
            if vobj.lost:
                raise CKError(DEVICE_ERROR, f"session object {vobj.handle} lost: {vobj.lost}")
        self.lost_operation(vs, shape)

    @staticmethod
    def session_state_first(vs: VirtualSession, shape: CallShape) -> None:
        """Before an unknown handle, what the session's operations say, in the order the
        token checks them: an init while an operation is active is CKR_OPERATION_ACTIVE,
        a call of an operation that is not active CKR_OPERATION_NOT_INITIALIZED."""
        fn = shape.fn
        if fn.op_role == "init" and fn.op_kind != "find" and (vs.ops or vs.find is not None):
            raise CKError(OPERATION_ACTIVE)
        if fn.op_kind and fn.op_role != "init" and fn.op_kind not in vs.ops:
            raise CKError(OPERATION_NOT_INITIALIZED)

    @staticmethod
    def lost_operation(vs: VirtualSession, shape: CallShape) -> None:
        """A call that continues an operation its session lost (on a failover) gets
        CKR_DEVICE_ERROR, once; an init of that kind starts afresh."""
        kind = operation_kind(shape.fn.name)
        if kind is not None and kind in vs.lost:
            why = vs.lost.pop(kind)
            if shape.fn.name not in INIT:  # a new operation of the kind starts afresh
                raise CKError(DEVICE_ERROR, f"{kind} operation lost: {why}")

    async def objects_lost(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                           shape: CallShape, vreq: list[Any]) -> bool:
        """After CKR_OBJECT_HANDLE_INVALID (or another handle role's code: STALE_OBJECT)
        for objects the daemon knows on `member`: asks the member about each, and
        forgets the member handles it no longer has (they are found again by identity,
        or remade, when the call is tried again). An object deleted behind p11p's back
        costs that object only: the member's other sessions and objects stay. False
        when the member session itself is gone."""
        real_session = vs.real.get(member)
        if real_session is None:
            return False
        handles = [vreq[i] for i in shape.objects] + self.mechanism_objects(vreq, shape)
        for handle in handles:
            vobj = ctx.objects.find(handle) if isinstance(handle, int) else None
            real = vobj.real.get(member) if vobj is not None else None
            if vobj is None or real is None:
                continue
            reply = await self.r.link.checked(ctx, member, [CODE["C_GetAttributeValue"], real_session,
                                                            real, [[CKA_CLASS, 8]]])
            if reply[0] in (SESSION_HANDLE_INVALID, SESSION_CLOSED):
                return False
            if reply[0] == OBJECT_HANDLE_INVALID:
                ctx.unregister(vobj, member)
                log.warning("object handle lost: %s member=%s function=%s object=%s: looked "
                            "up again", vs.describe(), member.name, shape.fn.name, vobj.handle)
            else:
                log.warning("object handle refused: %s member=%s function=%s object=%s: the "
                            "member still has it; tried again", vs.describe(), member.name,
                            shape.fn.name, vobj.handle)
        return True

    def named_objects(self, ctx: ApplicationContext, shape: CallShape,
                      vreq: list[Any]) -> dict[int, VirtualObject]:
        """The objects a request names (handles and mechanism parameters), by handle."""
        named: dict[int, VirtualObject] = {}
        for handle in [vreq[i] for i in shape.objects] + self.mechanism_objects(vreq, shape):
            vobj = ctx.objects.find(handle) if isinstance(handle, int) else None
            if vobj is not None:
                named[handle] = vobj
        return named

    @staticmethod
    def mechanism_objects(vreq: list[Any], shape: CallShape) -> list[Any]:
        if shape.mechanism is None:
            return []
        mech = vreq[shape.mechanism]
        if not (isinstance(mech, list) and len(mech) == 2 and isinstance(mech[1], list)):
            return []
        fields = MECH_OBJECT_FIELDS.get(mech[0]) if isinstance(mech[0], int) else None
        return [mech[1][k] for k in fields or () if k < len(mech[1])]

    async def translate(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                        shape: CallShape, vreq: list[Any],
                        sources: dict[int, VirtualObject] | None = None) -> list[Any]:
        """The member's form of a request: its session and object handles there (made
        when missing). `sources`: a recipe's objects, destroyed ones included."""
        def lookup(handle: Any) -> VirtualObject:
            found = sources.get(handle) if sources is not None else None
            return found if found is not None else ctx.objects.get(handle)

        mreq = list(vreq)
        mreq[1] = member_session(vs.real, member)  # gone if a concurrent call reset it
        for i in shape.objects:
            vobj = lookup(vreq[i])
            mreq[i] = await self.ensure_object(ctx, vs, vobj, member)
        if shape.mechanism is not None:
            handles = self.mechanism_objects(vreq, shape)
            if handles:
                mech = vreq[shape.mechanism]
                params = list(mech[1])
                for k in MECH_OBJECT_FIELDS[mech[0]]:
                    vobj = lookup(params[k])
                    params[k] = await self.ensure_object(ctx, vs, vobj, member)
                mreq[shape.mechanism] = [mech[0], params]
        return mreq

    async def ensure_object(self, ctx: ApplicationContext, vs: VirtualSession,
                            vobj: VirtualObject, member: Member) -> int:
        """The object's handle on `member`: found by identity (token objects) or made
        again from its recipe (session objects)."""
        real = vobj.real.get(member)
        if real is not None:
            return real
        if vobj.lost:
            raise CKError(DEVICE_ERROR, f"session object {vobj.handle} lost: {vobj.lost}")
        if member in vobj.missing or (vobj.home is not None and vobj.home is not member):
            raise KeyMissing
        if vobj.is_token and vobj.identity is not None:
            return await self.resolve(ctx, vobj, member)
        if vobj.random_held():
            # its member serves it (used or not): calls that need it go there; remade
            # here it would be another key
            raise KeyMissing
        if not vobj.replayable or vobj.recipe is None:
            raise CKError(OBJECT_HANDLE_INVALID, "session object cannot be remade")
        recipe = vobj.recipe
        owner = vobj.owner if vobj.owner is not None and ctx.sessions.find(vobj.owner.handle) is vobj.owner else vs
        if owner is not vs and member not in owner.real:
            owner.bare.add(member)
        await self.r.bind.session_on(ctx, owner, member)
        shape = SHAPES[recipe.request[0]]
        reply = await self.r.link.replayed(ctx, member, await self.translate(
            ctx, owner, member, shape, recipe.request, recipe.sources))
        if reply[0] == OBJECT_HANDLE_INVALID and recipe.sources:
            # a source the daemon knows on the member was refused: the member lost it
            # (it is looked up again) or p11p's session (reset); the call is placed again
            # and the remake tried once more, as for any call (DESIGN, Failure handling)
            if not await self.objects_lost(ctx, owner, member, shape, recipe.request):
                await self.r.failures.reset_member(ctx, member)
            raise SessionVanished
        if reply[0] != OK:
            # refused where it was made before (a private half after a logout, say): lost,
            # and answered as lost objects are (README, Limits), here and where used next
            vobj.lost = f"remaking it: {rv_name(reply[0])}"
            raise CKError(DEVICE_ERROR, f"session object {vobj.handle} lost: {vobj.lost}")
        for j, made in zip(shape.created, recipe.outputs, strict=False):
            if made is not None and isinstance(reply[j], int) and made.destroyed \
                    and made is not vobj:
                # the other half of a key pair the application destroyed: made again
                # with the half it keeps, it goes at once (a search would find it)
                await self.r.link.raw(ctx, member, [CODE["C_DestroyObject"],
                                                    member_session(owner.real, member), reply[j]])
                continue
            if made is not None and isinstance(reply[j], int):
                ctx.register(made, member, reply[j], vs.group)
                self.r.daemon.audit.replicated(ctx, vs.group, made, member)
                for edit in made.edits:
                    done = await self.r.link.replayed(ctx, member, [
                        CODE["C_SetAttributeValue"], member_session(owner.real, member), reply[j],
                        edit])
                    if done[0] != OK:
                        raise CKError(OBJECT_HANDLE_INVALID,
                                      f"remaking a session object's attributes: {rv_name(done[0])}")
        await self.drop_remade(ctx, owner, member, recipe.sources.values())
        return member_session(vobj.real, member)

    async def drop_remade(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                          objects: Iterable[VirtualObject]) -> None:
        """Session objects the application destroyed that were made again on `member`
        only for a call (a recipe's source, an operation's key for its replay) go again."""
        for src in objects:
            if src.destroyed and not src.is_token and member in src.real:
                real = src.real[member]
                ctx.unregister(src, member)
                await self.r.link.raw(ctx, member, [CODE["C_DestroyObject"],
                                                    member_session(vs.real, member), real])

    async def resolve(self, ctx: ApplicationContext, vobj: VirtualObject, member: Member) -> int:
        # One find at a time on the utility session; whoever waited may find it done.
        async with ctx.utility_lock(member):
            real = vobj.real.get(member)
            if real is not None:
                return real
            if member in vobj.missing:
                raise KeyMissing
            return await self.find_by_identity(ctx, vobj, member)

    async def find_by_identity(self, ctx: ApplicationContext, vobj: VirtualObject,
                               member: Member) -> int:
        assert vobj.identity is not None
        for _ in range(2):
            real = await self.r.bind.utility_session(ctx, member)
            reply = await self.r.link.checked(ctx, member, [CODE["C_FindObjectsInit"], real,
                                                            vobj.identity.template()])
            if reply[0] == OK:
                try:
                    reply = await self.r.link.checked(ctx, member,
                                                      [CODE["C_FindObjects"], real, 2])
                finally:
                    await self.r.link.raw(ctx, member, [CODE["C_FindObjectsFinal"], real])
            if reply[0] not in (SESSION_HANDLE_INVALID, SESSION_CLOSED):
                break
            # the member lost p11p's own session too (a reset): a fresh one, once
            if ctx.utility.get(member) == real:
                del ctx.utility[member]
        if reply[0] in (SESSION_HANDLE_INVALID, SESSION_CLOSED):
            raise SessionVanished
        if reply[0] != OK:
            # the search failed: whether the member holds the object is not known
            raise CKError(reply[0], "looking up a key")
        found = reply[1] if isinstance(reply[1], list) else []
        if len(found) != 1:
            vobj.missing.add(member)
            log.warning("key sets differ: group=%s member=%s %s object %s (label=%r id=%s)",
                        member.group.label, member.name, "lacks" if not found else "has several of",
                        vobj.handle, vobj.identity.label,
                        vobj.identity.object_id.hex() if vobj.identity.object_id else None)
            raise KeyMissing
        ctx.register(vobj, member, found[0], member.group)
        return int(found[0])

    def scattered(self, ctx: ApplicationContext, vs: VirtualSession,
                  searched: Member | None) -> dict[Member, dict[int, VirtualObject]]:
        """The application's session objects on vs's token that `searched` does not
        hold, by a member in service that does (its handle there -> the object)."""
        out: dict[Member, dict[int, VirtualObject]] = {}
        for vobj in ctx.objects.values():
            if vobj.is_token is not False or vobj.group is not vs.group or vobj.lost \
                    or searched in vobj.real:
                continue
            holder = next((m for m in vobj.real if m.health.usable), None)
            if holder is not None:
                out.setdefault(holder, {})[vobj.real[holder]] = vobj
        return out

    def orphans(self, ctx: ApplicationContext, vs: VirtualSession) -> dict[int, VirtualObject]:
        """The application's session objects on vs's token that no member in service
        holds (theirs failed) and that can be made again."""
        return {vobj.handle: vobj for vobj in ctx.objects.values()
                if vobj.is_token is False and vobj.group is vs.group and not vobj.lost
                and vobj.replayable and not any(m.health.usable for m in vobj.real)}

    async def found_elsewhere(self, ctx: ApplicationContext, vs: VirtualSession,
                              template: Any, searched: Member | None) -> list[int]:
        """The virtual handles of the application's session objects on members other
        than `searched` that a search with `template` finds there. PKCS#11 shows a
        session object to every session of the application; under balance those
        sessions are on several members, and so are the objects they made."""
        found: list[int] = []
        for member, held in self.scattered(ctx, vs, searched).items():
            try:
                handles = await self.search_on(ctx, member, template, len(held))
            except (SessionVanished, MemberUnavailable) as exc:
                if isinstance(exc, MemberUnavailable):
                    self.r.failures.member_failed(member, exc, vs.describe())
                elif any(member in vobj.real for vobj in held.values()):
                    # the member lost the application's sessions (a session-lost code to
                    # the open of p11p's own session there): as for a call of its own
                    await self.r.failures.reset_member(ctx, member)
                # its objects are gone from there: those that can be made again are made
                # on the searched member, and looked for there
                found += await self.found_moved(ctx, vs, template, searched, held)
                continue
            found += [held[h].handle for h in handles if h in held]
        orphans = self.orphans(ctx, vs)
        if orphans:
            found += await self.found_moved(ctx, vs, template, searched, orphans)
        return found

    async def search_on(self, ctx: ApplicationContext, member: Member, template: Any,
                        expected: int) -> list[int]:
        """A search on the context's own member session on `member`. A member that lost
        the application's sessions is reset (the objects p11p knew there are found
        again, or made again) and SessionVanished raised (link.replayed)."""
        async with ctx.utility_lock(member):
            real = await self.r.bind.utility_session(ctx, member)
            reply = await self.r.link.replayed(ctx, member,
                                               [CODE["C_FindObjectsInit"], real, template])
            if reply[0] != OK:
                return []
            try:
                reply = await self.r.link.replayed(
                    ctx, member, [CODE["C_FindObjects"], real, expected + 256])
            finally:
                await self.r.link.raw(ctx, member, [CODE["C_FindObjectsFinal"], real])
        return list(reply[1]) if reply[0] == OK and isinstance(reply[1], list) else []

    async def found_moved(self, ctx: ApplicationContext, vs: VirtualSession, template: Any,
                          searched: Member | None,
                          held: dict[int, VirtualObject]) -> list[int]:
        if searched is None:
            return []
        moved: dict[int, VirtualObject] = {}
        for vobj in held.values():
            if vobj.lost or not vobj.replayable:
                continue
            try:
                moved[await self.ensure_object(ctx, vs, vobj, searched)] = vobj
            except (CKError, KeyMissing, SessionVanished):
                continue
            except MemberUnavailable as exc:
                # the searched member failed as it made the object: failed here, and the
                # caller searches again where the session goes (search.py)
                self.r.failures.member_failed(searched, exc, "C_FindObjectsInit")
                raise
        if not moved:
            return []
        try:
            handles = await self.search_on(ctx, searched, template, len(moved))
        except (SessionVanished, MemberUnavailable):
            return []
        return [moved[h].handle for h in handles if h in moved]

    async def drop_copies(self, ctx: ApplicationContext, vs: VirtualSession,
                          copies: dict[Member, int], served: Member | None) -> None:
        """A session object the application destroyed (on `served`) goes from the other
        members where p11p made it again: left there, a search would find it."""
        for member, real in copies.items():
            if member is served or not member.health.usable:
                continue
            try:
                async with ctx.utility_lock(member):
                    session = await self.r.bind.utility_session(ctx, member)
                    await self.r.link.raw(ctx, member, [CODE["C_DestroyObject"], session, real])
            except SessionVanished:
                continue  # the member lost this application's sessions, and the copy
            except MemberUnavailable as exc:
                self.r.failures.member_failed(member, exc, vs.describe())

    async def object_from(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                          real: int, created: bool) -> VirtualObject:
        """The virtual object for a member handle, registering it when new."""
        vobj = ctx.by_real.get((member, real))
        if vobj is not None and not created:
            return vobj
        if vobj is not None:  # the module reused a handle for a new object
            vobj.real.pop(member, None)
            del ctx.by_real[(member, real)]
        for _ in range(3):  # a passing refusal must not leave the object without identity
            reply = await self.r.link.checked(ctx, member, [CODE["C_GetAttributeValue"],
                                                            member_session(vs.real, member),
                                                            real, IDENTITY_TEMPLATE])
            if reply[0] in VALUES_READ:
                break
        is_token, identity, private = None, None, None
        if len(reply) > 1 and isinstance(reply[1], list) and len(reply[1]) == len(IDENTITY_TEMPLATE):
            is_token, identity = identity_from_values(reply[1])
            private = private_from_values(reply[1])
        if not created and is_token and identity is not None:
            known = ctx.token_index.get((vs.group, identity))
            if known is not None and member not in known.real:
                ctx.register(known, member, real, vs.group)
                return known
        vobj = ctx.new_object()
        vobj.is_token, vobj.identity, vobj.private = is_token, identity, private
        ctx.register(vobj, member, real, vs.group)
        return vobj
