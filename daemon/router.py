"""The HA call path: every session call of every application goes through Router.call,
a chain of stages with one job each (DESIGN, "path of one call"):

    decode, admit   dispatch.py, shapes.py (typed view, unsafe arguments, limits)
    resolve         resolve.py   virtual handles to the member's (roles, identity, recipes)
    place           placement.py the member (policy, key sets, write policy, hold)
    bind            bind.py      member session, login, replay of what the session had
    execute         link.py      the member call within the call's deadline (budget.py)
    classify        policy.classify with the group's one CK_RV table; failures.py
    record          record.py    what the call changed, for a later replay
    reply           dispatch.py

A member-failed code, a time-out or a helper's death fails the member and the call is
placed again; a lost member session is rebuilt and the call tried again (bounded).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget
from p11p.daemon.bind import SessionBuilder
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import STALE_OBJECT, CKError, MemberUnavailable, RvClass
from p11p.daemon.failures import Failures
from p11p.daemon.helperproc import CallTimedOut
from p11p.daemon.link import MemberLink
from p11p.daemon.members import Group, Member
from p11p.daemon.placement import Placement
from p11p.daemon.policy import choose_member, classify
from p11p.daemon.record import Recorder
from p11p.daemon.replicate import Replicator
from p11p.daemon.resolve import HandleResolver
from p11p.daemon.shapes import (
    DEVICE_ERROR,
    GENERAL_ERROR,
    OBJECT_HANDLE_INVALID,
    SHAPES,
    CallShape,
    KeyMissing,
    Reply,
    SessionVanished,
    unsafe_arguments,
)
from p11p.daemon.virtual import VirtualSession
from p11p.protocol import spec
from p11p.protocol.constants import CKR, CKU, rv_name

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.ha")
CONTEXT_SPECIFIC = CKU["CKU_CONTEXT_SPECIFIC"]
OPERATION_ACTIVE = CKR["CKR_OPERATION_ACTIVE"]
OPERATION_NOT_INITIALIZED = CKR["CKR_OPERATION_NOT_INITIALIZED"]


class Router:
    """Runs calls on members with failover, replay and recovery hand-off."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.link = MemberLink(self)
        self.place = Placement(self)
        self.bind = SessionBuilder(self)
        self.resolve = HandleResolver(self)
        self.record = Recorder(self)
        self.failures = Failures(self)
        self.replicate = Replicator(self)

    async def call(self, ctx: ApplicationContext, vs: VirtualSession, vreq: list[Any],
                   spared: set[Member] | None = None) -> Reply:
        """One application call on its session, with placement, failover and replay.
        `spared`: members not to place it on (they broke what the call starts again)."""
        shape = SHAPES[vreq[0]]
        try:
            return await self._call(ctx, vs, shape, vreq, set(spared or ()))
        except CKError:
            # an error p11p answers ends the operation the call continued, as the
            # token's own error would (PKCS#11 §5.2): it is not replayed any more
            self.record.ended(vs, shape)
            raise

    def earlier(self, vs: VirtualSession, shape: CallShape, reply: Reply) -> Reply:
        """A member's CKR_GENERAL_ERROR, answered after no other member could take the
        call: the operation the call continued ends, as the token's error ended it there
        (PKCS#11 §5.2). A member session where it was replayed meanwhile may still hold
        it: the next init there finds it stale and replaces that session."""
        self.record.ended(vs, shape)
        return reply

    async def _call(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                    vreq: list[Any], spared: set[Member]) -> Reply:
        unsafe = unsafe_arguments(shape, vreq)
        if unsafe is not None:
            raise unsafe
        self.resolve.lookup(ctx, vs, shape, vreq)
        fn = shape.fn
        if (fn.op_kind and fn.op_kind != "find" and fn.op_role != "init"
                and fn.op_kind not in vs.ops):
            # p11p's view of the session's operations is whole (the client hands over
            # those of the data plane before such a call comes here): none of that kind
            # runs in the member session either, and a member's fault is no answer to it
            raise CKError(OPERATION_NOT_INITIALIZED)
        group = vs.group
        deadline = budget.current()
        carried = ctx.carried.pop(vs.handle, None) if ctx.carried else None
        if carried is not None:  # the rest of a direct call whose member hung
            deadline.carried(carried, group)
        write = await self.place.write_target(ctx, vs, shape, vreq)
        if write == "all":
            return await self.replicate.call(ctx, vs, shape, vreq)
        tries = 0
        limit = 2 * len(group.members) + 2
        # `spared`: answered CKR_GENERAL_ERROR, and still serve (and those the caller names)
        answered: Reply | None = None  # that answer, while another member is tried
        while True:
            tries += 1
            try:
                member = await self.place.place(ctx, vs, shape, vreq, write, spared)
            except CKError:
                if answered is not None:  # no other member can take it after all
                    return self.earlier(vs, shape, answered)
                raise
            try:
                if write is None and not self.place.visiting(ctx, vs, shape, member, bool(spared)):
                    await self.bind.prepare(ctx, vs, member)
                    self.resolve.lost_operation(vs, shape)  # lost just now, in the move
                    if shape.found is not None and vs.find is not None and vs.find.pending is not None:
                        return self.bind.pending_batch(vs, vreq)  # a find just replayed here
                else:
                    await self.bind.session_on(ctx, vs, member)
                mreq = await self.resolve.translate(ctx, vs, member, shape, vreq)
                reply = await self.link.raw(ctx, member, mreq)
                # CKR_USER_NOT_LOGGED_IN from C_Login is no answer to it (§5.6): the
                # member's state is off whatever the application's, as for a logged-in one
                cls = classify(reply[0], group.rv_classes,
                               group in ctx.logins or (shape.fn.login == "login"
                                                       and vreq[2] != CONTEXT_SPECIFIC),
                               bool(shape.objects))
                if cls is RvClass.MEMBER_FAILED:
                    if reply[0] != GENERAL_ERROR or not await self.link.still_serves(ctx, member):
                        raise MemberUnavailable(member.name, f"{shape.fn.name} returned "
                                                f"{rv_name(reply[0])}", reply[0])
                    # CKR_GENERAL_ERROR from a member that still answers: modules give it
                    # for odd arguments too, so the member is not failed (one application
                    # could otherwise take it from everybody). The call is tried on
                    # another member, which hides a hiccup; with none left, the
                    # application gets the code.
                    spared.add(member)
                    answered = reply
                    # a call of no operation visits the other member when the session
                    # cannot move (placement.visiting)
                    if write is None and tries < limit and self.place.others(
                            ctx, vs, shape, vreq, spared) and (
                            self.bind.rebuildable(vs) or not shape.fn.op_kind):
                        log.info("%s: %s returned %s on %s, which still serves: trying "
                                 "another member", vs.describe(), shape.fn.name,
                                 rv_name(reply[0]), member.name)
                        # whatever the call left there (an operation it did not end) goes
                        # with the member session; the next use opens a fresh one. A call
                        # of no operation leaves none: the session's own operations stay
                        # there, and the call visits the other member (placement.visiting)
                        if shape.fn.op_kind or (not vs.ops and self.bind.rebuildable(vs)):
                            await self.bind.close_on(ctx, vs, member)
                        continue
                    log.info("%s: %s returned %s on %s, which still serves: answered as is",
                             vs.describe(), shape.fn.name, rv_name(reply[0]), member.name)
                if (reply[0] == OPERATION_ACTIVE and shape.fn.op_role == "init" and not vs.ops
                        and vs.direct is None and tries < limit and self.bind.rebuildable(vs)):
                    # no operation of the session is active in p11p's view: the member
                    # session kept one that an error p11p answered ended (the member never
                    # heard of it), or one the member kept after it refused its final
                    # (PKCS#11 §5.2: the final ends it; SoftHSM2 keeps a single-part
                    # operation whose C_SignFinal it refused); a fresh member session
                    # takes the call
                    log.warning("stale operation: %s member=%s function=%s: the member "
                                "session is replaced", vs.describe(), member.name, shape.fn.name)
                    await self.bind.close_on(ctx, vs, member)
                    continue
                if cls is RvClass.SESSION_LOST:
                    if tries >= limit:
                        return reply
                    if reply[0] in STALE_OBJECT and await self.resolve.objects_lost(
                            ctx, vs, member, shape, vreq):
                        continue
                    log.warning("session lost: %s member=%s function=%s rv=%s; new session, "
                                "login and replay", vs.describe(), member.name, shape.fn.name,
                                rv_name(reply[0]))
                    await self.failures.reset_member(ctx, member)
                    continue
                await self.record.record(ctx, vs, member, shape, vreq, reply)
                return reply
            except MemberUnavailable as exc:
                self.failures.member_failed(member, exc, shape.fn.name)
                if isinstance(exc, CallTimedOut):
                    # its member outlived its part (hung, or its helper killed by another
                    # call's time-out): the call has the rest of its time elsewhere; a
                    # member that failed at once leaves the reserve for a hung one next
                    deadline.member_timed_out(group)
                if tries >= limit:
                    raise CKError(DEVICE_ERROR, "no member could serve the call") from None
            except KeyMissing:
                if tries >= limit:
                    if answered is not None:
                        return self.earlier(vs, shape, answered)
                    raise CKError(OBJECT_HANDLE_INVALID, "no member holds the object") from None
            except SessionVanished:
                if tries >= limit:
                    raise
            except CKError:
                if answered is not None:  # the member tried next could not take the call
                    return self.earlier(vs, shape, answered)
                raise

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
                return member, await self.link.checked(ctx, member, mreq)
            except MemberUnavailable as exc:
                self.failures.member_failed(member, exc, spec.by_code()[request[0]].name)
                if isinstance(exc, CallTimedOut):
                    call.member_timed_out(group)  # the rest of the call for another, as in call()
                if tries > 2 * len(group.members) + 1:
                    raise CKError(DEVICE_ERROR) from None
