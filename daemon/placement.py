"""The place stage: which member serves a call (policy.choose_member over the members
that hold its objects), a token write's member under the group's write_policy, and the
hold while no member of the group is in service (hold_timeout).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import CKError, MemberUnavailable
from p11p.daemon.members import Member
from p11p.daemon.policy import Operation, choose_member
from p11p.daemon.shapes import (
    CREATING,
    DEVICE_ERROR,
    MODIFYING,
    OBJECT_HANDLE_INVALID,
    SHAPES,
    WRITE_PROTECTED,
    CallShape,
    KeyMissing,
    SessionVanished,
    template_sets_token,
)
from p11p.daemon.virtual import VirtualObject, VirtualSession
from p11p.protocol.constants import CKF, CKR

if TYPE_CHECKING:
    from p11p.daemon.router import Router

log = logging.getLogger("p11p.ha")
CKF_RW_SESSION = CKF["CKF_RW_SESSION"]
SESSION_READ_ONLY = CKR["CKR_SESSION_READ_ONLY"]


def remakeable(ctx: ApplicationContext, op: Operation, handle: Any) -> bool:
    """Whether an operation's key can be had on another member for a replay: the
    application still has it, or it is a session key it destroyed since that its recipe
    makes again (bind.replay_operation)."""
    if not isinstance(handle, int):
        return False
    if ctx.objects.find(handle) is not None:
        return True
    key = op.keys.get(handle)
    return key is not None and key.destroyed and key.replayable


class Placement:
    def __init__(self, router: Router) -> None:
        self.r = router

    async def place(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
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
                # a token write runs in a member session of its own (router.py): what
                # it names counts, not the keys of the session's operations
                allowed = self.allowed(ctx, shape, vreq, vs, ops=False)
                if allowed is not None and member not in allowed:
                    # what it copies (a key made at random) is on another member only:
                    # the token object is written there, which becomes its home
                    member = next((m for m in allowed if m.placeable), None) or next(
                        (m for m in allowed if m.health.usable), None)
            elif write is not None:
                home = ctx.objects.get(vreq[shape.objects[0]]).home
                member = home if home is not None and home.health.usable else None
            else:
                allowed = self.allowed(ctx, shape, vreq, vs)
                if allowed is not None and not allowed and not shape.fn.op_kind and vs.ops:
                    # no member holds both what a call of no operation names and its
                    # session's operations' keys: it needs only the former, and visits a
                    # member that holds them (visiting); the session stays with its work
                    allowed = self.allowed(ctx, shape, vreq, vs, ops=False)
                if allowed is not None and not allowed:
                    self.unreachable(ctx, vs, shape, vreq)
                if spared:
                    allowed = [m for m in (group.members if allowed is None else allowed)
                               if m not in spared]
                    if not allowed:  # the others lack what it needs: its answer stands
                        raise CKError(DEVICE_ERROR, "no other member can take the call")
                    if not any(m.health.usable for m in allowed):
                        # the others are out of service: waiting for one is not worth
                        # holding the answer the members in service gave
                        raise CKError(DEVICE_ERROR, "no other member in service")
                member = choose_member(group.members, group.config.policy, vs.member,  # type: ignore[assignment]
                                       vs.movable, allowed)
                if member is None and allowed:
                    # what the call needs is held only by members that take no new work
                    # (draining): one of them serves it, as it serves the work it has
                    member = next((m for m in allowed if m.health.usable), None)
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

    def needed(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
               vreq: list[Any], ops: bool = True) -> list[VirtualObject]:
        """The objects a call needs on its member: those it names, and (`ops`) the keys
        of the session's active operations (they are replayed where the session goes)."""
        objs = list(self.r.resolve.named_objects(ctx, shape, vreq).values())
        for op in vs.ops.values() if ops else ():
            # a key made at random whose member left is lost for the operation (which is
            # lost where the session goes, README), not for the call
            objs += [o for o in self.operation_keys(ctx, op) if not self.gone(o)]
        return objs

    def operation_keys(self, ctx: ApplicationContext, op: Operation) -> list[VirtualObject]:
        """The objects an active operation's init names: those the application has, and
        the session keys it destroyed since, which the operation keeps (made again from
        their recipes for its replay: where they can be made counts as for the others)."""
        named = self.r.resolve.named_objects(ctx, SHAPES[op.init[0]], op.init)
        kept = [k for h, k in op.keys.items() if h not in named and k.destroyed]
        return [*named.values(), *kept]

    @staticmethod
    def gone(vobj: VirtualObject) -> bool:
        """A session object made at random and used, whose members are all out of
        service: it cannot be made again anywhere."""
        return (vobj.is_token is False and not vobj.replayable
                and not any(m.health.usable for m in vobj.real))

    @staticmethod
    def held_back(ctx: ApplicationContext, vs: VirtualSession) -> Member | None:
        """The session's member, when an operation active there cannot be replayed
        elsewhere (over replay_limit, or its key destroyed since and not to be made
        again: a token object, a key whose bits have shown): moved, the session would
        lose it."""
        member = vs.member
        if member is None or not member.health.usable or member not in vs.real:
            return None
        for op in vs.ops.values():
            init = SHAPES[op.init[0]]
            if not op.replayable or any(not remakeable(ctx, op, op.init[i]) for i in init.objects):
                return member
        return None

    def pinned(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape) -> Member | None:
        """For a call of an operation on a session held back: its member. Moved, the
        session would lose its operation, for a call the token answers from the
        session's state (CKR_OPERATION_ACTIVE, CKR_OPERATION_NOT_INITIALIZED) or that
        continues it."""
        if not shape.fn.op_kind or shape.fn.op_kind == "find":
            return None
        return self.held_back(ctx, vs)

    def visiting(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                 member: Member, retry: bool = False) -> bool:
        """A call of no operation placed on another member than its session's, when the
        session holds back (what it needs is there only), or is tried there after a
        CKR_GENERAL_ERROR (`retry`) beside operations, or beside what cannot be closed at
        will (bind.rebuildable: a binding of the data plane, a search), or when the keys
        of the session's operations are not there (what it names is elsewhere only, as in
        place): it runs in a member session of its own there (as a token write does), and
        the session stays where its operations are (moved, their replay could fail where
        they go on)."""
        return (not shape.fn.op_kind and member is not vs.member
                and (self.held_back(ctx, vs) is not None
                     or (retry and (bool(vs.ops) or not self.r.bind.rebuildable(vs)))
                     or not self.takes_operations(ctx, vs, member)))

    def takes_operations(self, ctx: ApplicationContext, vs: VirtualSession,
                         member: Member) -> bool:
        """Whether `member` holds (or can make) the keys of the session's operations."""
        objs = [o for op in vs.ops.values() for o in self.operation_keys(ctx, op)
                if not self.gone(o)]
        return bool(self.restrict(objs, [member]))

    def allowed(self, ctx: ApplicationContext, shape: CallShape, vreq: list[Any],
                vs: VirtualSession, ops: bool = True) -> list[Member] | None:
        """The members that hold (or can make) every object the call needs; None: any."""
        objs = self.needed(ctx, vs, shape, vreq, ops)
        pin = self.pinned(ctx, vs, shape)
        if not objs:
            return None if pin is None else [pin]
        return self.restrict(objs, list(vs.group.members) if pin is None else [pin])

    @staticmethod
    def restrict(objs: list[VirtualObject], allowed: list[Member]) -> list[Member]:
        """The members of `allowed` that hold (or can make) every object of `objs`."""
        for vobj in objs:
            home = vobj.homed()
            if home is not None:
                allowed = [m for m in allowed if m is home]
            elif vobj.is_token is False and (not vobj.replayable or vobj.random_held()):
                # made at random and held by a member in service: calls go there (made
                # again elsewhere it would be another key under the same handle)
                allowed = [m for m in allowed if m in vobj.real]
            elif vobj.is_token is False and (homes := vobj.source_homes()) is not None:
                # made of a token object one member holds: there (or where it is)
                allowed = [m for m in allowed if m in homes or m in vobj.real]
            elif vobj.is_token and vobj.group is not None and vobj.identity is not None \
                    and vobj.identity in vobj.group.destroyed:
                # written to one member and destroyed there through p11p: only a handle
                # known still may be tried (the member answers it); no other member has it
                allowed = [m for m in allowed if m in vobj.real]
            allowed = [m for m in allowed if m not in vobj.missing]
            if vobj.is_token is False and vobj.recipe is not None:
                # not where what it is made from is known missing, unless it is there
                lacking = vobj.sources_missing()
                allowed = [m for m in allowed if m in vobj.real or m not in lacking]
        return allowed

    def unreachable(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
                    vreq: list[Any]) -> None:
        """No member can take the call: a session object it needs that was made at random
        and used, and whose member is out of service, is lost (CKR_DEVICE_ERROR, logged
        once; README); otherwise an object is on no member (CKR_OBJECT_HANDLE_INVALID)."""
        # what the session's state says comes first, as the token checks it (a call of an
        # operation that is not active is CKR_OPERATION_NOT_INITIALIZED wherever it runs)
        self.r.resolve.session_state_first(vs, shape)
        lost = [o for o in self.needed(ctx, vs, shape, vreq) if self.gone(o)]
        for vobj in lost:
            if not vobj.lost:
                vobj.lost = "made at random and used; its member is out of service"
                log.error("session potentially not recoverable: %s: session object %s: %s",
                          vs.describe(), vobj.handle, vobj.lost)
        if lost:
            raise CKError(DEVICE_ERROR, "a session object it needs is lost")
        raise CKError(OBJECT_HANDLE_INVALID, "no member holds the object")

    def others(self, ctx: ApplicationContext, vs: VirtualSession, shape: CallShape,
               vreq: list[Any], spared: set[Member]) -> bool:
        """Whether a member not in `spared` could take this call now (a draining member
        serves the sessions it has, and takes no other: with it alone left, the call
        answers as is)."""
        allowed = self.allowed(ctx, shape, vreq, vs)
        pool = vs.group.members if allowed is None else allowed
        return any(m.placeable and m not in spared for m in pool)

    async def write_target(self, ctx: ApplicationContext, vs: VirtualSession,
                           shape: CallShape, vreq: list[Any]) -> str | None:
        """None for an ordinary call; 'primary', 'home' or 'all' for a token object write
        in a group of several members (write_policy); refused writes raise."""
        group = vs.group
        if len(group.members) < 2:
            return None
        name = shape.fn.name
        write = None
        if name in CREATING:
            token = any(template_sets_token(vreq[i]) for i in shape.templates)
            if shape.fn.writes == "copy":
                source = ctx.objects.get(vreq[shape.objects[0]])
                explicit = template_sets_token(vreq[shape.templates[0]])
                token = explicit is True or (explicit is None and bool(source.is_token))
            write = "primary" if token else None
        elif name in MODIFYING:
            vobj = ctx.objects.get(vreq[shape.objects[0]])
            if vobj.is_token:
                if not vs.flags & CKF_RW_SESSION:
                    raise CKError(SESSION_READ_ONLY)  # the token's answer, before any other
                if group.config.write_policy == "all":
                    return "all"  # every member that holds it (replicate.py)
                if vobj.home is None and not await self.find_home(ctx, vs, vobj):
                    log.warning("token object write refused: %s function=%s: the object is on "
                                "several members and p11p does not write partially",
                                vs.describe(), name)
                    raise CKError(WRITE_PROTECTED)
                write = "home"
        if write is not None and group.config.write_policy == "refuse":
            raise CKError(WRITE_PROTECTED)
        if write is not None and group.config.write_policy == "all":
            return "all"  # every member in service (replicate.py)
        return write

    async def find_home(self, ctx: ApplicationContext, vs: VirtualSession,
                        vobj: VirtualObject) -> bool:
        """Whether a token object is held by exactly one member in service, which then
        becomes its home (it was written through p11p by another application, or behind
        p11p's back): a write there is no partial write."""
        if vobj.identity is None:
            return False
        known = vs.group.homes.get(vobj.identity)
        if known is not None and known.health.usable:
            vobj.home = known  # written through p11p there, by another application
            return True
        holders = []
        for member in vs.group.members:
            if not member.health.usable:
                return False  # what a member out of service holds is not known
            try:
                try:
                    await self.r.resolve.ensure_object(ctx, vs, vobj, member)
                except SessionVanished:  # the member lost p11p's session: once more
                    await self.r.resolve.ensure_object(ctx, vs, vobj, member)
            except KeyMissing:
                continue
            except MemberUnavailable as exc:
                self.r.failures.member_failed(member, exc, vs.describe())
                return False
            holders.append(member)
        if len(holders) != 1:
            return False
        vobj.home = holders[0]
        return True
