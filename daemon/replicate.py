"""write_policy = "all": token objects written through p11p are on every member in
service.

A write (C_CreateObject, C_CopyObject, C_UnwrapKey, C_DeriveKey making a token object)
runs on the first member in service, then the same call on each other one: it makes the
same object there (same template, same wrapped bytes, same base key). A generated key
(C_GenerateKey, C_GenerateKeyPair) would be another key on each member: it is generated
on the first and wrapped there with the group's `replicate_with` key (CKM_AES_KEY_WRAP_PAD),
then unwrapped on the others with the application's template; a public key is created
there from its public attributes. A member that refuses (the key is not extractable, the
template does not fit) refuses the call: what was made is destroyed everywhere and the
application gets the member's code, logged. A key is never left on one member silently.
C_SetAttributeValue and C_DestroyObject on a token object run on every member that holds
it. A member that fails during a write is failed as for any call; it is brought up to
date when it returns (`sync`, before it takes calls).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any

from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import CKError, MemberUnavailable
from p11p.daemon.members import Member
from p11p.daemon.shapes import (
    CODE,
    DEVICE_ERROR,
    OK,
    CallShape,
    KeyMissing,
    Reply,
    SessionVanished,
    member_session,
)
from p11p.daemon.virtual import VirtualSession
from p11p.protocol.constants import CKA, CKK, CKM, CKO, CKR, rv_name

if TYPE_CHECKING:
    from p11p.daemon.router import Router

log = logging.getLogger("p11p.ha")
_ULONG = struct.Struct("=Q")
WRAP_MECHANISM = [CKM["CKM_AES_KEY_WRAP_PAD"], None]
# attributes only a generation takes: an unwrap or a creation refuses them
GENERATION_ONLY = {CKA["CKA_VALUE_LEN"], CKA["CKA_MODULUS_BITS"]}
# the attributes that make a public key, by key type
PUBLIC_PARTS = {CKK["CKK_EC"]: [CKA["CKA_EC_PARAMS"], CKA["CKA_EC_POINT"]],
                CKK["CKK_RSA"]: [CKA["CKA_MODULUS"], CKA["CKA_PUBLIC_EXPONENT"]]}


def _ulong(value: int) -> bytes:
    return _ULONG.pack(value)


def _unulong(value: Any) -> int | None:
    return int(_ULONG.unpack(value)[0]) if isinstance(value, bytes) and len(value) == 8 else None


class Refused(Exception):
    """A member refused the copy of a write: the application gets its code."""

    def __init__(self, rv: int, why: str) -> None:
        super().__init__(why)
        self.rv = rv


class Replicator:
    def __init__(self, router: Router) -> None:
        self.r = router

    async def call(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                   vreq: list[Any]) -> Reply:
        """A token object write under write_policy = "all" (see the module's text)."""
        group = vs.group
        tried: set[Member] = set()
        while True:
            first = next((m for m in group.members if m.placeable and m not in tried), None)
            if first is None:
                raise CKError(DEVICE_ERROR, "no member in service takes the write")
            try:
                await self.r.bind.session_on(ctx, vs, first)
                mreq = await self.r.resolve.translate(ctx, vs, first, shape, vreq)
                reply = await self.r.link.checked(ctx, first, mreq)
                break
            except MemberUnavailable as exc:
                self.r.failures.member_failed(first, exc, shape.fn.name)
                tried.add(first)
            except (KeyMissing, SessionVanished):
                tried.add(first)
        others = [m for m in group.members if m is not first and m.health.usable]
        if reply[0] != OK or not shape.created:
            if reply[0] == OK:  # set or destroy: on every member that holds the object
                await self.everywhere(ctx, vs, shape, vreq, others)
            if reply[0] == OK and shape.fn.writes == "destroy":
                vobj = ctx.objects.get(vreq[shape.objects[0]])
                for member in group.members:
                    if not member.health.usable and vobj.identity is not None:
                        group.destroyed_while_out.setdefault(member, set()).add(vobj.identity)
                        group.written += 1
            await self.r.record.record(ctx, vs, first, shape, vreq, reply)
            return reply
        made: dict[Member, list[int]] = {first: [reply[j] for j in shape.created]}
        try:
            for member in others:
                try:
                    made[member] = await self.copy_to(ctx, vs, member, first, shape, vreq,
                                                      made[first])
                except MemberUnavailable as exc:  # its own failure: synced when it returns
                    self.r.failures.member_failed(member, exc, shape.fn.name)
        except Refused as exc:
            log.error("token object write refused: %s function=%s: %s; undone on %s",
                      vs.describe(), shape.fn.name, exc,
                      ", ".join(m.name for m in made))
            await self.undo(ctx, vs, made)
            return [exc.rv] + [None] * (len(reply) - 1)
        await self.r.record.record(ctx, vs, first, shape, vreq, reply)
        for k, j in enumerate(shape.created):
            vobj = ctx.objects.get(reply[j])  # homed nowhere (record.py): on every member
            for member, handles in made.items():
                if member is not first:
                    ctx.register(vobj, member, handles[k], group)
                    self.r.daemon.audit.replicated(ctx, group, vobj, member)
        return reply

    async def everywhere(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                         vreq: list[Any], others: list[Member]) -> None:
        for member in others:
            try:
                await self.r.bind.session_on(ctx, vs, member)
                mreq = await self.r.resolve.translate(ctx, vs, member, shape, vreq)
                reply = await self.r.link.checked(ctx, member, mreq)
            except KeyMissing:
                continue  # it does not hold the object (p11p keys shows it)
            except SessionVanished:
                continue
            except MemberUnavailable as exc:
                self.r.failures.member_failed(member, exc, shape.fn.name)
                continue
            if reply[0] != OK:
                log.error("token object write not applied on every member: %s member=%s "
                          "function=%s rv=%s (p11p keys %s shows the difference)",
                          vs.describe(), member.name, shape.fn.name, rv_name(reply[0]),
                          vs.group.label)

    async def copy_to(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                      first: Member, shape: CallShape, vreq: list[Any],
                      handles: list[int]) -> list[int]:
        """The objects `first` made, made on `member` too; their handles there."""
        session = await self.r.bind.session_on(ctx, vs, member)
        if shape.fn.writes != "generate":
            try:
                mreq = await self.r.resolve.translate(ctx, vs, member, shape, vreq)
            except KeyMissing:
                raise Refused(CKR["CKR_OBJECT_HANDLE_INVALID"],
                              f"member {member.name} lacks an object the call names") from None
            except CKError as exc:  # a session object it names cannot be made there
                raise Refused(exc.rv, f"on member {member.name}: {exc}") from None
            reply = await self.r.link.checked(ctx, member, mreq)
            if reply[0] != OK:
                raise Refused(reply[0], f"{shape.fn.name} on member {member.name} returned "
                              f"{rv_name(reply[0])}")
            return [reply[j] for j in shape.created]
        label = vs.group.config.replicate_with
        if label is None:
            raise Refused(CKR["CKR_KEY_NOT_WRAPPABLE"],
                          "a generated key is replicated with replicate_with, which is not set")
        source = member_session(vs.real, first)
        src_kek = await self.wrapping_key(ctx, first, source, label)
        dst_kek = await self.wrapping_key(ctx, member, session, label)
        templates = [vreq[i] for i in shape.templates]
        out: list[int] = []
        try:
            for handle, template in zip(handles, templates[-len(handles):], strict=True):
                cls, key_type = await self.kind(ctx, first, source, handle)
                if cls == CKO["CKO_PUBLIC_KEY"]:
                    out.append(await self.public_copy(ctx, first, source, handle, member,
                                                      session, template, key_type))
                else:
                    out.append(await self.wrapped_copy(ctx, first, source, src_kek, handle,
                                                       member, session, dst_kek, template, cls,
                                                       key_type))
        except Refused:
            await self.undo(ctx, vs, {member: out})  # a public key made before the refusal
            raise
        return out

    async def wrapping_key(self, ctx: ApplicationContext, member: Member, session: int,
                           label: str) -> int:
        found = await self.find(ctx, member, session, [[CKA["CKA_LABEL"], label.encode()],
                                                       [CKA["CKA_CLASS"],
                                                        _ulong(CKO["CKO_SECRET_KEY"])]])
        if len(found) != 1:
            raise Refused(CKR["CKR_WRAPPING_KEY_HANDLE_INVALID"],
                          f"member {member.name} has {len(found)} keys labelled {label!r} "
                          "(replicate_with)")
        return found[0]

    async def find(self, ctx: ApplicationContext, member: Member, session: int,
                   template: list[Any]) -> list[int]:
        reply = await self.r.link.checked(ctx, member, [CODE["C_FindObjectsInit"], session,
                                                        template])
        if reply[0] != OK:
            return []
        try:
            reply = await self.r.link.checked(ctx, member, [CODE["C_FindObjects"], session, 8])
        finally:
            await self.r.link.raw(ctx, member, [CODE["C_FindObjectsFinal"], session])
        return list(reply[1]) if reply[0] == OK and isinstance(reply[1], list) else []

    async def attributes(self, ctx: ApplicationContext, member: Member, session: int,
                         handle: int, attrs: list[int]) -> list[Any]:
        reply = await self.r.link.checked(ctx, member, [CODE["C_GetAttributeValue"], session,
                                                        handle, [[a, 4096] for a in attrs]])
        if reply[0] != OK or not isinstance(reply[1], list):
            raise Refused(reply[0] if reply[0] != OK else CKR["CKR_FUNCTION_FAILED"],
                          f"reading the new key's attributes on {member.name}: "
                          f"{rv_name(reply[0])}")
        return list(reply[1])

    async def kind(self, ctx: ApplicationContext, member: Member, session: int,
                   handle: int) -> tuple[int | None, int | None]:
        cls, key_type = await self.attributes(ctx, member, session, handle,
                                              [CKA["CKA_CLASS"], CKA["CKA_KEY_TYPE"]])
        return _unulong(cls), _unulong(key_type)

    @staticmethod
    def template_for(template: list[Any], extra: list[list[Any]]) -> list[Any]:
        """The application's template without what only a generation takes, with
        `extra` (class, key type, public parts) where it lacks them."""
        have = {a[0] for a in template if isinstance(a, list) and a}
        kept = [a for a in template if isinstance(a, list) and a and a[0] not in GENERATION_ONLY]
        return kept + [a for a in extra if a[0] not in have]

    async def public_copy(self, ctx: ApplicationContext, first: Member, source: int,
                          handle: int, member: Member, session: int, template: list[Any],
                          key_type: int | None) -> int:
        parts = PUBLIC_PARTS.get(key_type) if key_type is not None else None
        if parts is None or key_type is None:
            raise Refused(CKR["CKR_KEY_TYPE_INCONSISTENT"],
                          f"p11p does not copy public keys of type {key_type}")
        values = await self.attributes(ctx, first, source, handle, parts)
        if key_type == CKK["CKK_RSA"]:
            template = [a for a in template if a[0] != CKA["CKA_PUBLIC_EXPONENT"]]
        extra = [[CKA["CKA_CLASS"], _ulong(CKO["CKO_PUBLIC_KEY"])],
                 [CKA["CKA_KEY_TYPE"], _ulong(key_type)]] + [
                     [a, v] for a, v in zip(parts, values, strict=True)]
        reply = await self.r.link.checked(ctx, member, [
            CODE["C_CreateObject"], session, self.template_for(template, extra), 0])
        if reply[0] != OK:
            raise Refused(reply[0], f"creating the public key on {member.name}: "
                          f"{rv_name(reply[0])}")
        return int(reply[1])

    async def wrapped_copy(self, ctx: ApplicationContext, first: Member, source: int,
                           src_kek: int, handle: int, member: Member, session: int,
                           dst_kek: int, template: list[Any], cls: int | None,
                           key_type: int | None) -> int:
        reply = await self.r.link.checked(ctx, first, [CODE["C_WrapKey"], source, WRAP_MECHANISM,
                                                       src_kek, handle, 1 << 16])
        if reply[0] != OK:
            raise Refused(reply[0], f"the new key cannot be wrapped on {first.name} "
                          f"(replicate_with): {rv_name(reply[0])}")
        wrapped = reply[1]
        extra = [[CKA["CKA_CLASS"], _ulong(cls if cls is not None else CKO["CKO_SECRET_KEY"])]]
        if key_type is not None:
            extra.append([CKA["CKA_KEY_TYPE"], _ulong(key_type)])
        reply = await self.r.link.checked(ctx, member, [
            CODE["C_UnwrapKey"], session, WRAP_MECHANISM, dst_kek, wrapped,
            self.template_for(template, extra), 0])
        if reply[0] != OK:
            raise Refused(reply[0], f"unwrapping the new key on {member.name}: "
                          f"{rv_name(reply[0])}")
        return int(reply[1])

    async def undo(self, ctx: ApplicationContext, vs: VirtualSession,
                   made: dict[Member, list[int]]) -> None:
        for member, handles in made.items():
            session = vs.real.get(member)
            if session is None:
                continue
            for handle in handles:
                try:
                    await self.r.link.raw(ctx, member, [CODE["C_DestroyObject"], session, handle])
                except MemberUnavailable as exc:
                    self.r.failures.member_failed(member, exc, "C_DestroyObject")
                    break
