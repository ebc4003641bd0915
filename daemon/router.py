"""The HA call path: every session call of every application goes through Router.call.

For one call it picks the member (policy.choose_member), makes sure the virtual session
exists there (member session, login, replayed operation and find state, session
objects remade from their recipes), maps virtual handles to the member's, sends the
call, classifies the member's CK_RV (policy.classify) and then either returns the
reply, or treats the member as failed / the session as lost and tries again
(bounded). Finally it records what the call changed, so that the session can be
rebuilt elsewhere later.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import CKError, MemberUnavailable, RvClass
from p11p.daemon.helperproc import CallTimedOut
from p11p.daemon.members import Group, Member, MemberState
from p11p.daemon.policy import (
    INIT,
    Operation,
    choose_member,
    classify,
    operation_change,
    operation_kind,
)
from p11p.daemon.virtual import (
    CKA_CLASS,
    CKA_TOKEN,
    IDENTITY_TEMPLATE,
    FindState,
    Recipe,
    VirtualObject,
    VirtualSession,
    identity_from_values,
)
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKR, rv_name

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.ha")
Reply = list[Any]

OK = CKR["CKR_OK"]
DEVICE_ERROR = CKR["CKR_DEVICE_ERROR"]
OBJECT_HANDLE_INVALID = CKR["CKR_OBJECT_HANDLE_INVALID"]
WRITE_PROTECTED = CKR["CKR_TOKEN_WRITE_PROTECTED"]
MECHANISM_PARAM_INVALID = CKR["CKR_MECHANISM_PARAM_INVALID"]
ATTRIBUTE_VALUE_INVALID = CKR["CKR_ATTRIBUTE_VALUE_INVALID"]
ALREADY_LOGGED_IN = CKR["CKR_USER_ALREADY_LOGGED_IN"]
SESSION_HANDLE_INVALID = CKR["CKR_SESSION_HANDLE_INVALID"]
SESSION_CLOSED = CKR["CKR_SESSION_CLOSED"]
GENERAL_ERROR = CKR["CKR_GENERAL_ERROR"]
CODE = {f.name: f.code for f in spec.functions()}
# From functions.spec's @writes flags.
GENERATING = frozenset(f.name for f in spec.functions() if f.writes == "generate")
CREATING = frozenset(f.name for f in spec.functions() if f.writes in spec.CREATES)
MODIFYING = frozenset(f.name for f in spec.functions() if f.writes in ("destroy", "set"))
_MECH_OBJECT_FIELDS = {
    m.value: [i for i, f in enumerate(m.param.fields) if f.kind == "object"]
    for m in spec.mechanisms().values() if any(f.kind == "object" for f in m.param.fields)
}


@dataclass(frozen=True)
class CallShape:
    """Where a function's handles and buffers sit in its request and reply."""

    fn: spec.Function
    objects: tuple[int, ...]  # request positions of object handles
    object_rvs: tuple[int, ...]  # per object handle, the CK_RV of an unknown one (its role)
    mechanism: int | None  # request position of the mechanism
    templates: tuple[int, ...]  # request positions of input templates
    templates_get: tuple[int, ...]  # request positions of templates to read
    data: int | None  # request position of the first bytes input
    out_bytes: int | None  # request position of an out_bytes capacity
    created: tuple[int, ...]  # reply positions of new object handles
    found: int | None  # reply position of a found-objects list


def _shape(fn: spec.Function) -> CallShape:
    req = list(enumerate(fn.wire_args, 1))
    outs = list(enumerate(fn.outputs, 1))

    def first(kind: str) -> int | None:
        return next((i for i, a in req if a.kind == kind), None)

    return CallShape(
        fn, tuple(i for i, a in req if a.kind == "object"),
        tuple(CKR[spec.HANDLE_ROLES[a.role]] for _, a in req if a.kind == "object"),
        first("mechanism"),
        tuple(i for i, a in req if a.kind == "template"),
        tuple(i for i, a in req if a.kind == "template_get"), first("bytes"), first("out_bytes"),
        tuple(j for j, a in outs if a.kind == "out_object"),
        next((j for j, a in outs if a.kind == "out_objects"), None))


SHAPES = {f.code: _shape(f) for f in spec.functions()}


def _unsafe(shape: CallShape, vreq: list[Any]) -> CKError | None:
    """Arguments that a module would read memory through, never passed on: a module
    that crashes on them takes its helper down, and a helper that dies is a failed
    member for every application. A mechanism of mechanisms.spec with a bin parameter
    (the module would take its bytes for the structure and follow pointers in it), and
    an input attribute with a NULL value and a non-zero length, at any depth (SoftHSM2
    reads through it in C_CreateObject, C_GenerateKey, C_FindObjectsInit, ...)."""
    if shape.mechanism is not None:
        mech = vreq[shape.mechanism]
        if (isinstance(mech, list) and len(mech) == 2 and isinstance(mech[1], bytes)
                and isinstance(mech[0], int) and mech[0] in _STRUCTURED):
            return CKError(MECHANISM_PARAM_INVALID, "a structured parameter sent as bytes")
    stack = [vreq[i] for i in shape.templates]
    while stack:
        template = stack.pop()
        if not isinstance(template, list):
            continue
        for attr in template:
            if isinstance(attr, list) and len(attr) == 2:
                value = attr[1]
                if isinstance(value, int) and value != 0:
                    return CKError(ATTRIBUTE_VALUE_INVALID, "an attribute value NULL with a length")
                if isinstance(value, list):
                    stack.append(value)
    return None


_STRUCTURED = frozenset(spec.mechanisms())


class KeyMissing(Exception):
    """A token object is not on this member (its key set differs)."""


class SessionVanished(CKError):
    """A member session just opened was gone when it was logged in (its helper was
    replaced meanwhile: the member failed and recovered under a concurrent call). The
    call is placed again; where it is not, it is CKR_DEVICE_ERROR as before."""

    def __init__(self) -> None:
        super().__init__(DEVICE_ERROR, "the member session vanished before its login")


# Calls on an object that show nothing of a random key's bits (a C_CopyObject copy
# depends on its source through its recipe instead), and the attributes that do.
_NOT_A_USE = frozenset(f.name for f in spec.functions()
                       if f.writes in ("copy", "destroy", "set") or f.reads)
_REVEALING = frozenset(CKA[n] for n in (
    "CKA_VALUE", "CKA_CHECK_VALUE", "CKA_MODULUS", "CKA_PUBLIC_EXPONENT", "CKA_EC_POINT",
    "CKA_PUBLIC_KEY_INFO", "CKA_PRIVATE_EXPONENT", "CKA_PRIME_1", "CKA_PRIME_2"))


def _reveals(shape: CallShape, vreq: list[Any]) -> bool:
    """Whether a successful call shows the bits of the objects it names."""
    if shape.fn.reads:  # reading the value attributes shows the bits
        return any(isinstance(a, list) and a and a[0] in _REVEALING
                   for i in shape.templates_get for a in (vreq[i] or []) if isinstance(vreq[i], list))
    return shape.fn.name not in _NOT_A_USE


def _digest(data: Any) -> bytes | None:
    return hashlib.blake2b(data, digest_size=16).digest() if isinstance(data, bytes) else None


def _template_sets_token(template: Any) -> bool | None:
    if isinstance(template, list):
        for attr in template:
            if isinstance(attr, list) and len(attr) == 2 and attr[0] == CKA_TOKEN:
                return bool(attr[1] == b"\x01")
    return None


class Router:
    """Runs calls on members with failover, replay and recovery hand-off."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    # -- one call on one member ------------------------------------------------------

    async def raw(self, ctx: ApplicationContext, member: Member, request: list[Any]) -> Reply:
        """One call through the context's helper; MemberUnavailable when it cannot run.
        The helper's start and the call draw from the application call's deadline
        (budget.py): past it the helper is killed (CallTimedOut)."""
        deadline = budget.current().deadline(member.group)
        if deadline <= time.monotonic():
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
            if isinstance(exc, CallTimedOut) and not budget.fair(timeout, member.group):
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

    # -- the session call path -------------------------------------------------------

    async def call(self, ctx: ApplicationContext, vs: VirtualSession, vreq: list[Any]) -> Reply:
        shape = SHAPES[vreq[0]]
        unsafe = _unsafe(shape, vreq)
        if unsafe is not None:
            raise unsafe
        self._lookup(ctx, vs, shape, vreq)
        group = vs.group
        deadline = budget.current()
        carried = ctx.carried.pop(vs.handle, None) if ctx.carried else None
        if carried is not None:  # the rest of a direct call whose member hung
            deadline.carried(carried, group)
        write = self._write_target(ctx, vs, shape, vreq)
        tries = 0
        limit = 2 * len(group.members) + 2
        spared: set[Member] = set()  # answered CKR_GENERAL_ERROR, and still serve
        while True:
            tries += 1
            member = await self._place(ctx, vs, shape, vreq, write, spared)
            try:
                if write is None:
                    await self._prepare(ctx, vs, member)
                    if shape.found is not None and vs.find is not None and vs.find.pending is not None:
                        return self.pending_batch(vs, vreq)  # a find just replayed here
                else:
                    await self._session_on(ctx, vs, member)
                mreq = await self._translate(ctx, vs, member, shape, vreq)
                reply = await self.raw(ctx, member, mreq)
                cls = classify(reply[0], group.rv_classes, group in ctx.logins,
                               bool(shape.objects))
                if cls is RvClass.MEMBER_FAILED:
                    if reply[0] != GENERAL_ERROR or not await self._still_serves(ctx, member):
                        raise MemberUnavailable(member.name, f"{shape.fn.name} returned "
                                                f"{rv_name(reply[0])}", reply[0])
                    # CKR_GENERAL_ERROR from a member that still answers: modules give it
                    # for odd arguments too, so the member is not failed (one application
                    # could otherwise take it from everybody). The call is tried on
                    # another member, which hides a hiccup; with none left, the
                    # application gets the code.
                    spared.add(member)
                    if write is None and tries < limit and self._others(ctx, vs, shape, vreq,
                                                                        spared):
                        log.info("%s: %s returned %s on %s, which still serves: trying "
                                 "another member", vs.describe(), shape.fn.name,
                                 rv_name(reply[0]), member.name)
                        # whatever the call left there (an operation it did not end) goes
                        # with the member session; the next use opens a fresh one
                        await self._close_on(ctx, vs, member)
                        continue
                    log.info("%s: %s returned %s on %s, which still serves: answered as is",
                             vs.describe(), shape.fn.name, rv_name(reply[0]), member.name)
                if cls is RvClass.SESSION_LOST:
                    if tries >= limit:
                        return reply
                    if reply[0] == OBJECT_HANDLE_INVALID and await self._objects_lost(
                            ctx, vs, member, shape, vreq):
                        continue
                    log.warning("session lost: %s member=%s function=%s rv=%s; new session, "
                                "login and replay", vs.describe(), member.name, shape.fn.name,
                                rv_name(reply[0]))
                    await self.reset_member(ctx, member)
                    continue
                await self._record(ctx, vs, member, shape, vreq, reply)
                return reply
            except MemberUnavailable as exc:
                self.member_failed(member, exc, shape.fn.name)
                if isinstance(exc, CallTimedOut):
                    deadline.member_timed_out(group)
                if tries >= limit:
                    raise CKError(DEVICE_ERROR, "no member could serve the call") from None
            except KeyMissing:
                if tries >= limit:
                    raise CKError(OBJECT_HANDLE_INVALID, "no member holds the object") from None
            except SessionVanished:
                if tries >= limit:
                    raise

    def _lookup(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                vreq: list[Any]) -> None:
        """The call's object handles exist (else the CK_RV of their role), none of them
        is a lost session object, and the call does not continue a lost operation."""
        for i, invalid in zip(shape.objects, shape.object_rvs, strict=True):
            vobj = ctx.objects.find(vreq[i]) if isinstance(vreq[i], int) else None
            if vobj is None:
                raise CKError(invalid)
            if vobj.lost:
                raise CKError(DEVICE_ERROR, f"session object {vobj.handle} lost: {vobj.lost}")
        kind = operation_kind(shape.fn.name)
        if kind is not None and kind in vs.lost:
            why = vs.lost.pop(kind)
            if shape.fn.name not in INIT:  # a new operation of the kind starts afresh
                raise CKError(DEVICE_ERROR, f"{kind} operation lost: {why}")

    async def _objects_lost(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                            shape: CallShape, vreq: list[Any]) -> bool:
        """After CKR_OBJECT_HANDLE_INVALID for objects the daemon knows on `member`: asks
        the member about each, and forgets the member handles it no longer has (they are
        found again by identity, or remade, when the call is tried again). An object
        deleted behind p11p's back costs that object only: the member's other sessions
        and objects stay. False when the member session itself is gone."""
        real_session = vs.real.get(member)
        if real_session is None:
            return False
        handles = [vreq[i] for i in shape.objects] + self._mechanism_objects(vreq, shape)
        for handle in handles:
            vobj = ctx.objects.find(handle) if isinstance(handle, int) else None
            real = vobj.real.get(member) if vobj is not None else None
            if vobj is None or real is None:
                continue
            reply = await self.checked(ctx, member, [CODE["C_GetAttributeValue"], real_session,
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

    async def _still_serves(self, ctx: ApplicationContext, member: Member) -> bool:
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

    def _others(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                vreq: list[Any], spared: set[Member]) -> bool:
        """Whether a usable member not in `spared` could take this call."""
        allowed = self._allowed(ctx, shape, vreq, vs.group)
        pool = vs.group.members if allowed is None else allowed
        return any(m.health.usable and m not in spared for m in pool)

    async def _place(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                     vreq: list[Any], write: str | None,
                     spared: set[Member] | None = None) -> Member:
        """The member for this call; waits up to hold_timeout when none is usable (the
        time held is added to the call's deadline). Members in `spared` answered this
        call already: another is taken."""
        group = vs.group
        deadline = 0.0
        held_from = 0.0
        while True:
            member: Member | None
            if write == "primary":
                member = group.primary()
            elif write is not None:
                home = ctx.objects.get(vreq[shape.objects[0]]).home
                member = home if home is not None and home.health.usable else None
            else:
                allowed = self._allowed(ctx, shape, vreq, group)
                if allowed is not None and not allowed:
                    raise CKError(OBJECT_HANDLE_INVALID, "no member holds the object")
                if spared:
                    allowed = [m for m in (group.members if allowed is None else allowed)
                               if m not in spared]
                member = choose_member(group.members, group.config.policy, vs.member,  # type: ignore[assignment]
                                       vs.movable, allowed)
            if member is not None:
                if held_from:
                    budget.current().held(group, time.monotonic() - held_from)
                return member
            now = time.monotonic()
            if not deadline:
                deadline = budget.current().hold_until(group)
                held_from = now
                log.info("holding call: %s function=%s: no member of the group is usable",
                         vs.describe(), shape.fn.name)
            if now >= deadline:
                raise CKError(DEVICE_ERROR, "no usable member within hold_timeout")
            await group.wait_change(deadline - now)

    def _allowed(self, ctx: ApplicationContext, shape: CallShape, vreq: list[Any],
                 group: Group) -> list[Member] | None:
        objs = [ctx.objects.get(vreq[i]) for i in shape.objects]
        objs += [ctx.objects.get(h) for h in self._mechanism_objects(vreq, shape)]
        if not objs:
            return None
        allowed = list(group.members)
        for vobj in objs:
            if vobj.home is not None:
                allowed = [m for m in allowed if m is vobj.home]
            elif vobj.is_token is False and not vobj.replayable:
                allowed = [m for m in allowed if m in vobj.real]
            allowed = [m for m in allowed if m not in vobj.missing]
        return allowed

    def _named_objects(self, ctx: ApplicationContext, shape: CallShape,
                       vreq: list[Any]) -> dict[int, VirtualObject]:
        """The objects a request names (handles and mechanism parameters), by handle."""
        named: dict[int, VirtualObject] = {}
        for handle in [vreq[i] for i in shape.objects] + self._mechanism_objects(vreq, shape):
            vobj = ctx.objects.find(handle) if isinstance(handle, int) else None
            if vobj is not None:
                named[handle] = vobj
        return named

    @staticmethod
    def _mechanism_objects(vreq: list[Any], shape: CallShape) -> list[Any]:
        if shape.mechanism is None:
            return []
        mech = vreq[shape.mechanism]
        if not (isinstance(mech, list) and len(mech) == 2 and isinstance(mech[1], list)):
            return []
        fields = _MECH_OBJECT_FIELDS.get(mech[0]) if isinstance(mech[0], int) else None
        return [mech[1][k] for k in fields or () if k < len(mech[1])]

    def _write_target(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                      vreq: list[Any]) -> str | None:
        """None for an ordinary call; 'primary' or 'home' for a token object write in a
        group of several members (write_policy); refused writes raise."""
        group = vs.group
        if len(group.members) < 2:
            return None
        name = shape.fn.name
        write = None
        if name in CREATING:
            token = any(_template_sets_token(vreq[i]) for i in shape.templates)
            if shape.fn.writes == "copy":
                source = ctx.objects.get(vreq[shape.objects[0]])
                explicit = _template_sets_token(vreq[shape.templates[0]])
                token = explicit is True or (explicit is None and bool(source.is_token))
            write = "primary" if token else None
        elif name in MODIFYING:
            vobj = ctx.objects.get(vreq[shape.objects[0]])
            if vobj.is_token:
                if vobj.home is None:
                    log.warning("token object write refused: %s function=%s: the object is on "
                                "several members and p11p does not write partially",
                                vs.describe(), name)
                    raise CKError(WRITE_PROTECTED)
                write = "home"
        if write is not None and group.config.write_policy == "refuse":
            raise CKError(WRITE_PROTECTED)
        return write

    # -- making a session ready on a member -----------------------------------------

    async def _session_on(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> int:
        real = vs.real.get(member)
        if real is None:
            reply = await self.checked(ctx, member, [CODE["C_OpenSession"], member.slot_id,
                                                     vs.flags, 0])
            if reply[0] != OK:
                raise CKError(reply[0], f"re-opening the session on {member.name}")
            real = reply[1]
            vs.real[member] = real
        try:
            await self._login_on(ctx, vs.group, member, real)
        except SessionVanished:
            if vs.real.get(member) == real:
                del vs.real[member]
            raise
        return real

    async def _login_on(self, ctx: ApplicationContext, group: Group, member: Member, real: int) -> None:
        login = ctx.logins.get(group)
        if login is None or member in ctx.logged_in:
            return
        reply = await self.checked(ctx, member, [CODE["C_Login"], real, login[0], login[1]])
        if reply[0] in (SESSION_HANDLE_INVALID, SESSION_CLOSED):
            raise SessionVanished
        if reply[0] not in (OK, ALREADY_LOGGED_IN):
            log.error("session potentially not recoverable: %s member=%s: login failed with %s",
                      ctx.name, member.name, rv_name(reply[0]))
            raise CKError(DEVICE_ERROR, "login on another member failed")
        ctx.logged_in.add(member)

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
                await self._login_on(ctx, group, member, real)
            except MemberUnavailable as exc:
                self.member_failed(member, exc, "C_Login")
            except CKError as exc:  # it is logged in when it next serves, or the error shows then
                log.info("%s member=%s: login after the application's failed: %s", ctx.name,
                         member.name, exc)

    async def utility_session(self, ctx: ApplicationContext, member: Member) -> int:
        real = ctx.utility.get(member)
        if real is None:
            reply = await self.checked(ctx, member, [CODE["C_OpenSession"], member.slot_id,
                                                     4, 0])  # CKF_SERIAL_SESSION
            if reply[0] != OK:
                raise CKError(reply[0])
            real = ctx.utility[member] = reply[1]
        group = member.group
        try:
            await self._login_on(ctx, group, member, real)
        except SessionVanished:
            if ctx.utility.get(member) == real:
                del ctx.utility[member]
            raise
        return real

    async def _prepare(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> None:
        """The session on `member`, with everything it had elsewhere replayed."""
        # The state is there only if the session's member session survived: a member
        # that failed and recovered, or lost our sessions, needs the replay too.
        present = vs.member is member and member in vs.real
        await self._session_on(ctx, vs, member)
        if present:
            return
        old = vs.member
        if vs.direct is not None:
            await self.daemon.direct.revoke(vs)  # it moves, or its member session was lost
        lost: list[str] = []
        replayed: list[str] = []
        for vobj in list(vs.objects):
            if member not in vobj.real and not vobj.lost:
                try:
                    await self.ensure_object(ctx, vs, vobj, member)
                    replayed.append("object")
                except (CKError, KeyMissing) as exc:
                    vobj.lost = str(exc) or "its source is on no member"
                    lost.append(f"session object {vobj.handle}: {vobj.lost}")
        for kind, op in list(vs.ops.items()):
            why = op.why if not op.replayable else await self._replay_operation(ctx, vs, member, op)
            if why:
                lost.append(f"{kind} operation: {why}")
                del vs.ops[kind]
                vs.lost[kind] = why
            else:
                replayed.append(f"{kind}+{len(op.updates)} updates")
        if vs.find is not None and not vs.find.cached:
            await self._replay_find(ctx, vs, member, vs.find)
            replayed.append(f"find ({len(vs.find.returned)} already returned)")
        vs.member = member
        if old is not None and old is not member and old.health.state is MemberState.DRAINING:
            await self._close_on(ctx, vs, old)
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

    async def _replay_operation(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                                op: Operation) -> str:
        """Replays an operation's init and updates; returns why it failed, or ''."""
        reply = await self.checked(ctx, member, await self._translate(
            ctx, vs, member, SHAPES[op.init[0]], op.init))
        if reply[0] != OK:
            return f"init returned {rv_name(reply[0])}"
        for ureq, expected in op.updates:
            reply = await self.checked(ctx, member, await self._translate(
                ctx, vs, member, SHAPES[ureq[0]], ureq))
            if reply[0] != OK:
                return f"update returned {rv_name(reply[0])}"
            if expected is not None and _digest(reply[1]) != expected:
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

    async def _replay_find(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                           find: FindState) -> None:
        real = vs.real[member]
        reply = await self.checked(ctx, member, [CODE["C_FindObjectsInit"], real, find.template])
        if reply[0] != OK:
            raise CKError(reply[0], "replaying a find")
        found: list[int] = []
        while True:
            reply = await self.checked(ctx, member, [CODE["C_FindObjects"], real, 256])
            if reply[0] != OK:
                raise CKError(reply[0], "replaying a find")
            if not reply[1]:
                break
            for h in reply[1]:
                found.append((await self.object_from(ctx, vs, member, h, created=False)).handle)
        done = set(find.returned)
        find.pending = [h for h in found if h not in done]

    async def leave(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> None:
        """A movable session leaves `member` (drain): it is placed anew at its next call."""
        await self._close_on(ctx, vs, member)
        if vs.member is member:
            vs.member = None

    async def forget_real(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> None:
        """Closes the session's member session on `member`; the next use opens another."""
        await self._close_on(ctx, vs, member)

    async def _close_on(self, ctx: ApplicationContext, vs: VirtualSession, member: Member) -> None:
        if vs.direct is not None and vs.direct.member is member:
            await self.daemon.direct.revoke(vs)
        real = vs.real.pop(member, None)
        if real is not None and ctx.has_helper(member):
            try:
                await self.raw(ctx, member, [CODE["C_CloseSession"], real])
            except MemberUnavailable:
                pass
            self.closed_on(ctx, member)

    async def close_utility(self, ctx: ApplicationContext, member: Member) -> None:
        """Closes p11p's own member session of this context on `member`, if any."""
        real = ctx.utility.pop(member, None)
        if real is not None and ctx.has_helper(member):
            try:
                await self.raw(ctx, member, [CODE["C_CloseSession"], real])
            except MemberUnavailable:
                pass
            self.closed_on(ctx, member)

    @staticmethod
    def closed_on(ctx: ApplicationContext, member: Member) -> None:
        """A member session of `ctx` on `member` was closed: when it was the last one,
        the module has logged the application out there (PKCS#11 §5.6), and the next
        member session there logs in again."""
        if ctx.sessions_on(member) == 0:
            ctx.logged_in.discard(member)

    # -- handles ----------------------------------------------------------------------

    async def _translate(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                         shape: CallShape, vreq: list[Any],
                         sources: dict[int, VirtualObject] | None = None) -> list[Any]:
        """The member's form of a request: its session and object handles there (made
        when missing). `sources`: a recipe's objects, destroyed ones included."""
        def lookup(handle: Any) -> VirtualObject:
            found = sources.get(handle) if sources is not None else None
            return found if found is not None else ctx.objects.get(handle)

        mreq = list(vreq)
        mreq[1] = vs.real[member]
        for i in shape.objects:
            vobj = lookup(vreq[i])
            mreq[i] = await self.ensure_object(ctx, vs, vobj, member)
        if shape.mechanism is not None:
            handles = self._mechanism_objects(vreq, shape)
            if handles:
                mech = vreq[shape.mechanism]
                params = list(mech[1])
                for k in _MECH_OBJECT_FIELDS[mech[0]]:
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
        if member in vobj.missing or (vobj.home is not None and vobj.home is not member):
            raise KeyMissing
        if vobj.is_token and vobj.identity is not None:
            return await self._resolve(ctx, vobj, member)
        if not vobj.replayable or vobj.recipe is None:
            raise CKError(OBJECT_HANDLE_INVALID, "session object cannot be remade")
        recipe = vobj.recipe
        owner = vobj.owner if vobj.owner is not None and ctx.sessions.find(vobj.owner.handle) is vobj.owner else vs
        await self._session_on(ctx, owner, member)
        shape = SHAPES[recipe.request[0]]
        reply = await self.checked(ctx, member, await self._translate(
            ctx, owner, member, shape, recipe.request, recipe.sources))
        if reply[0] != OK:
            raise CKError(OBJECT_HANDLE_INVALID, f"remaking a session object: {rv_name(reply[0])}")
        for j, made in zip(shape.created, recipe.outputs, strict=False):
            if made is not None and isinstance(reply[j], int):
                ctx.register(made, member, reply[j], vs.group)
                for edit in made.edits:
                    done = await self.checked(ctx, member, [CODE["C_SetAttributeValue"],
                                                            owner.real[member], reply[j], edit])
                    if done[0] != OK:
                        raise CKError(OBJECT_HANDLE_INVALID,
                                      f"remaking a session object's attributes: {rv_name(done[0])}")
        for src in recipe.sources.values():
            # a source the application destroyed was remade for this only: it goes again
            if src.destroyed and member in src.real:
                real = src.real[member]
                ctx.unregister(src, member)
                await self.raw(ctx, member, [CODE["C_DestroyObject"], owner.real[member], real])
        return vobj.real[member]

    async def _resolve(self, ctx: ApplicationContext, vobj: VirtualObject, member: Member) -> int:
        # One find at a time on the utility session; whoever waited may find it done.
        async with ctx.utility_lock(member):
            real = vobj.real.get(member)
            if real is not None:
                return real
            if member in vobj.missing:
                raise KeyMissing
            return await self._find_by_identity(ctx, vobj, member)

    async def _find_by_identity(self, ctx: ApplicationContext, vobj: VirtualObject,
                                member: Member) -> int:
        assert vobj.identity is not None
        real = await self.utility_session(ctx, member)
        reply = await self.checked(ctx, member, [CODE["C_FindObjectsInit"], real,
                                                 vobj.identity.template()])
        if reply[0] != OK:
            raise CKError(reply[0], "looking up a key")
        try:
            reply = await self.checked(ctx, member, [CODE["C_FindObjects"], real, 2])
        finally:
            await self.raw(ctx, member, [CODE["C_FindObjectsFinal"], real])
        found = reply[1] if reply[0] == OK and isinstance(reply[1], list) else []
        if len(found) != 1:
            vobj.missing.add(member)
            log.warning("key sets differ: group=%s member=%s %s object %s (label=%r id=%s)",
                        member.group.label, member.name, "lacks" if not found else "has several of",
                        vobj.handle, vobj.identity.label,
                        vobj.identity.object_id.hex() if vobj.identity.object_id else None)
            raise KeyMissing
        ctx.register(vobj, member, found[0], member.group)
        return int(found[0])

    async def object_from(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                          real: int, created: bool) -> VirtualObject:
        """The virtual object for a member handle, registering it when new."""
        vobj = ctx.by_real.get((member, real))
        if vobj is not None and not created:
            return vobj
        if vobj is not None:  # the module reused a handle for a new object
            vobj.real.pop(member, None)
            del ctx.by_real[(member, real)]
        reply = await self.checked(ctx, member, [CODE["C_GetAttributeValue"], vs.real[member],
                                                 real, IDENTITY_TEMPLATE])
        is_token, identity = None, None
        if len(reply) > 1 and isinstance(reply[1], list) and len(reply[1]) == len(IDENTITY_TEMPLATE):
            is_token, identity = identity_from_values(reply[1])
        if not created and is_token and identity is not None:
            known = ctx.token_index.get((vs.group, identity))
            if known is not None and member not in known.real:
                ctx.register(known, member, real, vs.group)
                return known
        vobj = ctx.new_object()
        vobj.is_token, vobj.identity = is_token, identity
        ctx.register(vobj, member, real, vs.group)
        return vobj

    # -- recording --------------------------------------------------------------------

    async def _record(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                      shape: CallShape, vreq: list[Any], reply: Reply) -> None:
        rv = reply[0]
        name = shape.fn.name
        named = self._named_objects(ctx, shape, vreq)
        if rv == OK and _reveals(shape, vreq):
            for vobj in named.values():
                vobj.used = True  # its bits have shown: a random key is not remade now
        if rv == OK and shape.fn.writes == "set":
            for vobj in named.values():
                if not vobj.is_token:
                    vobj.edits.append(vreq[3])  # made again with the object
        if rv == OK and shape.created:
            made: list[VirtualObject | None] = []
            for j in shape.created:
                if isinstance(reply[j], int):
                    vobj = await self.object_from(ctx, vs, member, reply[j], created=True)
                    reply[j] = vobj.handle
                    made.append(vobj)
                else:
                    made.append(None)
            recipe = Recipe(list(vreq), made, name in GENERATING, named)
            for new in made:
                if new is None:
                    continue
                if new.is_token:
                    if len(vs.group.members) > 1:
                        new.home = member
                else:
                    new.recipe, new.owner = recipe, vs
                    vs.objects.add(new)
        if shape.found is not None and rv == OK and isinstance(reply[shape.found], list):
            handles = [(await self.object_from(ctx, vs, member, h, created=False)).handle
                       for h in reply[shape.found]]
            reply[shape.found] = handles
            if vs.find is not None:
                vs.find.returned += handles
        if shape.fn.op_kind == "find" and shape.fn.op_role == "init" and rv == OK:
            vs.find = FindState(vreq[2])
        elif shape.fn.op_kind == "find" and shape.fn.op_role == "final" and rv == OK:
            vs.find = None
        self._record_operation(vs, shape, vreq, reply)
        if vs.member is not None and vs.member.health.state is MemberState.DRAINING and vs.movable:
            await self._close_on(ctx, vs, vs.member)
            vs.member = None

    def _record_operation(self, vs: VirtualSession, shape: CallShape, vreq: list[Any],
                          reply: Reply) -> None:
        requested = shape.out_bytes is None or vreq[shape.out_bytes] is not None
        change = operation_change(shape.fn.name, reply[0], requested)
        if change.start is not None:
            vs.ops[change.start] = Operation(list(vreq))
        elif change.update is not None and requested:
            op = vs.ops.get(change.update)
            if op is None or not op.replayable:
                return
            data = vreq[shape.data] if shape.data is not None else b""
            size = len(data) if isinstance(data, bytes) else 0
            op.size += size
            limit = vs.group.config.replay_limit
            if op.size > limit:
                op.replayable, op.updates = False, []
                op.why = f"update data over replay_limit ({limit} bytes)"
                log.warning("session potentially not recoverable: %s: %s operation: %s",
                            vs.describe(), change.update, op.why)
                return
            ureq = list(vreq)
            out = None
            if shape.out_bytes is not None:
                out = reply[1]
                ureq[shape.out_bytes] = (len(out) if isinstance(out, bytes) else 0) + 256
            op.updates.append((ureq, _digest(out)))
        elif change.end is not None:
            vs.ops.pop(change.end, None)
        elif change.opaque:
            for kind, op in vs.ops.items():
                if op.replayable:
                    op.replayable, op.updates = False, []
                    op.why = f"{shape.fn.name} is not replayed by p11p"
                    log.warning("session potentially not recoverable: %s: %s operation: %s",
                                vs.describe(), kind, op.why)

    # -- failures ---------------------------------------------------------------------

    def member_failed(self, member: Member, exc: MemberUnavailable, function: str) -> None:
        """Takes a member out of rotation and starts its recovery (once)."""
        daemon = self.daemon
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
        member.discard_pool()
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
                await self.daemon.direct.revoke(vs)
        if ctx.has_helper(member) and member.slot_id is not None:
            try:
                await self.raw(ctx, member, [CODE["C_CloseAllSessions"], member.slot_id])
            except MemberUnavailable:
                pass
        for vs in ctx.sessions.values():
            vs.real.pop(member, None)  # rebuilt (with replay) on next use
        for key in [k for k in ctx.by_real if k[0] is member]:
            ctx.by_real.pop(key).real.pop(member, None)
        ctx.logged_in.discard(member)
        ctx.utility.pop(member, None)

    # -- group-level calls ------------------------------------------------------------

    async def group_call(self, ctx: ApplicationContext, group: Group, request: list[Any],
                         slot_index: int = 1) -> tuple[Member, Reply]:
        """A call that names the slot, on the serving member, with failover and hold."""
        tries = 0
        deadline = 0.0
        held_from = 0.0
        call = budget.current()
        while True:
            member = choose_member(group.members, "failover", None, True)
            if member is None:
                now = time.monotonic()
                if not deadline:
                    deadline = call.hold_until(group)
                    held_from = now
                if now >= deadline:
                    raise CKError(DEVICE_ERROR, "no usable member within hold_timeout")
                await group.wait_change(deadline - now)
                continue
            if held_from:
                call.held(group, time.monotonic() - held_from)
                deadline = held_from = 0.0
            assert isinstance(member, Member)
            mreq = list(request)
            mreq[slot_index] = member.slot_id
            tries += 1
            try:
                return member, await self.checked(ctx, member, mreq)
            except MemberUnavailable as exc:
                self.member_failed(member, exc, spec.by_code()[request[0]].name)
                if isinstance(exc, CallTimedOut):
                    call.member_timed_out(group)
                if tries > 2 * len(group.members) + 1:
                    raise CKError(DEVICE_ERROR) from None

    async def open_session(self, ctx: ApplicationContext, group: Group, flags: int) -> VirtualSession:
        vs = ctx.add_session(group, flags)
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
            member = await self._place(ctx, vs, shape, [], None)
            try:
                await self._prepare(ctx, vs, member)
                return
            except MemberUnavailable as exc:
                self.member_failed(member, exc, "C_OpenSession")
                if isinstance(exc, CallTimedOut):
                    budget.current().member_timed_out(vs.group)
                if tries >= limit:
                    raise CKError(DEVICE_ERROR) from None
            except SessionVanished:
                if tries >= limit:
                    raise

    async def close_session(self, ctx: ApplicationContext, vs: VirtualSession) -> None:
        for member in list(vs.real):
            await self._close_on(ctx, vs, member)
        ctx.forget_session(vs)
