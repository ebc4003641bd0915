"""The data plane: every call of a bound session that needs no decision goes from the
client library straight to its helper (helper/fast.c), without the daemon in between
(protocol/README.md, "Data plane").

The daemon stays the one place with policy. It binds a virtual session to the member
session it placed it on (DIRECT_BIND, with the group's replay_limit for the operations
the client keeps), answers which member handle a virtual key or object has there
(DIRECT_KEY, DIRECT_OBJECT), and revokes the binding whenever that member session stops
being the virtual session's: closed, reset, moved, or its helper gone. A revoked or
failing binding sends the client back here (DIRECT_UNBIND), where the call runs with
the usual failover and replay; the client sends the operations it ran on the data plane
again through the daemon first (their inits and updates), which records them as any.
When the client moves its operations here of its own accord (before a search, say) and
the binding still holds, their member session still runs them: they are handed over as
they are (DIRECT_ADOPT, DIRECT_ADOPT_UPDATE), recorded for a replay elsewhere, and not
run again.

While a session is bound its member session may hold operations the daemon did not
see: it is neither movable nor rebuildable at will (virtual.py, bind.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p11p.daemon import budget, hello
from p11p.daemon.errors import CONDITIONAL_SESSION_LOST, CKError, MemberUnavailable, RvClass
from p11p.daemon.helperproc import FAST_ALLOW, FAST_REVOKE, FAST_START, CallTimedOut
from p11p.daemon.policy import Operation
from p11p.daemon.shapes import SHAPES, KeyMissing, unsafe_arguments
from p11p.protocol import spec
from p11p.protocol.constants import CKR

if TYPE_CHECKING:
    from p11p.daemon.context import ApplicationContext
    from p11p.daemon.helperproc import HelperProcess
    from p11p.daemon.members import Member
    from p11p.daemon.router import Router
    from p11p.daemon.virtual import VirtualSession

log = logging.getLogger("p11p.direct")

# p11p's own codes (protocol/README.md):
# [DIRECT_BIND, session] -> [rv, [name, token, id, timeout_ms, slot, [rv...], replay_limit,
#   cpu_hint, pairs, mailbox]]
#   (replay_limit only on a connection that agreed the `data_plane` feature: a client
#   without it knows six fields; cpu_hint, whether the helper follows the client's CPU
#   hint, only with `cpu_hint` agreed too; pairs, whether it answers an init and the next
#   call sent at once, only with `plane_pairs` agreed too; mailbox, whether it gives a
#   connection a mailbox, only with `plane_mailbox` agreed too)
# [DIRECT_KEY, session, object] -> [rv, member handle]      a key an operation uses
# [DIRECT_OBJECT, session, object] -> [rv, member handle]   an object whose attributes are read
# [DIRECT_UNBIND, session, why] -> [rv]
# [DIRECT_ADOPT, session, init code, mechanism, key, replayable] -> [rv]
# [DIRECT_ADOPT_UPDATE, session, code, data, out capacity (0: none), output digest] -> [rv]
DIRECT_BIND = spec.own_codes()["DIRECT_BIND"].code
DIRECT_KEY = spec.own_codes()["DIRECT_KEY"].code
DIRECT_OBJECT = spec.own_codes()["DIRECT_OBJECT"].code
DIRECT_UNBIND = spec.own_codes()["DIRECT_UNBIND"].code
DATA_PLANE = "data_plane"  # the hello's feature of clients that keep data-plane operations
# DIRECT_BIND's fields after replay_limit, in order: (the hello's feature of clients that
# know the field, the helper's ready-frame feature it says the helper has). A field goes
# only while the hello agreed its feature and every one before it.
PLANE_FIELDS = (
    ("cpu_hint", "cpu_hint"),        # the client sends its CPU; the helper follows it
    ("plane_pairs", "pairs"),        # an init with its next call, answered at once
    ("plane_mailbox", "mailbox"),    # a connection's mailbox (protocol/p11p-box.h)
)
UNBIND_RETURNED = 0   # a data-plane call returned a code of the fallback list
UNBIND_LEAVING = 1    # the client moves its operations here (its own choice; ended there)
UNBIND_BROKEN = 2     # the connection to the helper broke
UNBIND_TIMEOUT = 3    # a data-plane call took longer than call_timeout: its helper is killed
UNBIND_WHY = (UNBIND_RETURNED, UNBIND_LEAVING, UNBIND_BROKEN, UNBIND_TIMEOUT)
# A data-plane call in flight this long (a share of call_timeout) confirms the client's
# UNBIND_TIMEOUT: the client's clock started a little before the helper's.
HUNG_SHARE = 0.9
STUCK_QUERY = 1.0  # seconds the helper has to answer how long its oldest call runs

OK = CKR["CKR_OK"]
GET_SESSION_INFO = spec.by_name()["C_GetSessionInfo"].code
SESSION_GONE = frozenset({CKR["CKR_SESSION_HANDLE_INVALID"], CKR["CKR_SESSION_CLOSED"]})
# Codes a data-plane call hands back to the daemon besides the group's session-lost and
# member-failed classes: the ones whose class depends on the daemon's view, and the
# helper's own refusals (a revoked binding, a module being finalized).
ALWAYS_FALLBACK = frozenset({
    *CONDITIONAL_SESSION_LOST, CKR["CKR_SESSION_HANDLE_INVALID"], CKR["CKR_KEY_HANDLE_INVALID"],
    CKR["CKR_CRYPTOKI_NOT_INITIALIZED"], CKR["CKR_SESSION_CLOSED"],
})


@dataclass(eq=False)
class Binding:
    member: Member
    real: int
    helper: HelperProcess
    fast_id: int


class Direct:
    """DIRECT_BIND, DIRECT_KEY, DIRECT_UNBIND, and revocation."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._moving: set[asyncio.Task[None]] = set()

    async def bind(self, ctx: ApplicationContext, req: list[Any]) -> list[Any]:
        vs = ctx.sessions.get(req[1])
        group = vs.group
        if not group.config.direct_calls or self.router.daemon.audit.enabled:
            # with an audit log every use of a key passes the daemon, which counts it
            return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
        if vs.ops or vs.find is not None:
            return [CKR["CKR_OPERATION_ACTIVE"]]
        await self.revoke(vs)
        await self.router.bind.call_prepare(ctx, vs)  # placed, opened, logged in
        member = vs.member
        if member is None or member.slot_id is None or member not in vs.real:
            return [CKR["CKR_FUNCTION_FAILED"]]
        real = vs.real[member]
        timeout = budget.member_limit(group)  # the client's limit on a data-plane call
        deadline = budget.current().member_deadline(group)
        left = deadline - time.monotonic()
        if not budget.fair(left, group):
            # the call's time went on its placement: no bind now (the client goes on
            # through the daemon, and asks again later); a helper command given only the
            # rest would fail the member for the call's time, not its own
            return [CKR["CKR_FUNCTION_FAILED"]]
        try:
            helper = await ctx.helper(member, deadline)
            if not await self._listening(helper, ctx.uid, deadline - time.monotonic()):
                return [CKR["CKR_FUNCTION_FAILED"]]
            reply = await helper.call([FAST_ALLOW, real], deadline - time.monotonic())
        except MemberUnavailable as exc:
            self.router.failures.member_failed(member, exc, "DIRECT_BIND")
            return [CKR["CKR_FUNCTION_FAILED"]]
        if reply[0] != OK:
            return [reply[0]]
        binding = Binding(member, real, helper, reply[1])
        if vs.member is not member or vs.real.get(member) != real or not helper.alive:
            await self._revoke(binding)  # the session moved meanwhile
            return [CKR["CKR_FUNCTION_FAILED"]]
        vs.bind(binding)
        fallback = sorted(ALWAYS_FALLBACK | {
            rv for rv, cls in group.rv_classes.items()
            if cls in (RvClass.SESSION_LOST, RvClass.MEMBER_FAILED)})
        assert helper.fast is not None
        name, token = helper.fast
        answer = [name, token, binding.fast_id, max(1, int(timeout * 1000)), group.slot_id,
                  fallback]
        agreed = hello.AGREED.get()
        if DATA_PLANE in agreed:
            answer.append(group.config.replay_limit)
            for link_feature, helper_feature in PLANE_FIELDS:
                if link_feature not in agreed:
                    break
                answer.append(helper_feature in helper.plane_features)
        return [OK, answer]

    @staticmethod
    async def _listening(helper: HelperProcess, uid: int, timeout: float) -> bool:
        """Starts the helper's listener once (sessions bound at the same time wait for
        the one start, and get the same name and token)."""
        if helper.fast_started is None:
            helper.fast_started = asyncio.get_running_loop().create_future()
            # a helper that served another application before keeps its listener's name
            # (a new token and uid end that one's connections: fast.c)
            name = helper.fast_name or f"p11p-direct-{secrets.token_hex(12)}".encode()
            token = secrets.token_bytes(16)
            ok = False
            try:
                reply = await helper.call([FAST_START, name, token, uid], timeout)
                ok = reply[0] == OK
                if ok:
                    helper.fast, helper.fast_name = (name, token), name
            finally:
                helper.fast_started.set_result(ok)
        return await asyncio.shield(helper.fast_started)

    async def key(self, ctx: ApplicationContext, req: list[Any]) -> list[Any]:
        vs = ctx.sessions.get(req[1])
        binding = vs.direct
        if binding is None:
            return [CKR["CKR_SESSION_HANDLE_INVALID"]]
        vobj = ctx.objects.get(req[2])
        if vobj.recipe is not None and vobj.recipe.roots and vobj.replayable:
            # made at random and not used yet: a member failing at the init the client
            # would send its helper leaves it made again elsewhere only if its use is
            # counted when the call succeeds, which the daemon sees for its own calls:
            # its first operation goes through here (CKR_FUNCTION_NOT_SUPPORTED)
            return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
        try:
            real = await self.router.resolve.ensure_object(ctx, vs, vobj, binding.member)
        except KeyMissing:
            return [CKR["CKR_KEY_HANDLE_INVALID"]]
        except MemberUnavailable as exc:
            self.router.failures.member_failed(binding.member, exc, "DIRECT_KEY")
            return [CKR["CKR_DEVICE_ERROR"]]
        vobj.used = True
        self.router.daemon.audit.direct_key(ctx, vs, vobj)
        return [OK, real]

    async def object(self, ctx: ApplicationContext, req: list[Any]) -> list[Any]:
        """The member handle of an object whose attributes the client reads on the data
        plane. Not a use of the object: a session key made at random and not used yet
        could show its bits there (CKA_VALUE), which would make remaking it elsewhere
        wrong; for those the read goes through the daemon (CKR_FUNCTION_NOT_SUPPORTED),
        which sees which attributes are read."""
        vs = ctx.sessions.get(req[1])
        binding = vs.direct
        if binding is None:
            return [CKR["CKR_SESSION_HANDLE_INVALID"]]
        vobj = ctx.objects.get(req[2])
        if vobj.recipe is not None and vobj.recipe.roots and vobj.replayable:
            return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
        try:
            real = await self.router.resolve.ensure_object(ctx, vs, vobj, binding.member)
        except KeyMissing:
            return [CKR["CKR_OBJECT_HANDLE_INVALID"]]
        except MemberUnavailable as exc:
            self.router.failures.member_failed(binding.member, exc, "DIRECT_OBJECT")
            return [CKR["CKR_DEVICE_ERROR"]]
        return [OK, real]

    async def adopt(self, ctx: ApplicationContext, req: list[Any]) -> list[Any]:
        """An operation begun on the data plane, handed over as it runs: the bound member
        session has it active, so nothing goes to the member; it is recorded as if it had
        started here (its updates follow, DIRECT_ADOPT_UPDATE), for a replay elsewhere
        should that member fail. Also after the daemon ended the binding itself (a
        revocation), while the session is still in that member session. Refused
        otherwise, or when p11p holds an operation of that kind already: the client then
        sends it again (a replay through here)."""
        vs = ctx.sessions.get(req[1])
        binding = vs.direct
        shape = SHAPES.get(req[2]) if isinstance(req[2], int) else None
        if shape is None or shape.fn.op_role != "init" or shape.fn.op_kind in ("", "find"):
            return [CKR["CKR_ARGUMENTS_BAD"]]
        kind = shape.fn.op_kind
        # the binding, or the one the daemon ended (the client's calls were refused by
        # the helper since, never reaching the module) while its member session is the
        # session's still
        held = binding if binding is not None else vs.left
        if (held is None or vs.real.get(held.member) != held.real or kind in vs.ops
                or (binding is None and (vs.member is not held.member
                                         or not held.member.health.usable))):
            return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
        init = [req[2], req[1], req[3], *([req[4]] if shape.objects else [])]
        if unsafe_arguments(shape, init) is not None:
            # never replayed to a member (the helper refuses it on the data plane too)
            return [CKR["CKR_ARGUMENTS_BAD"]]
        op = vs.ops[kind] = Operation(init, keys=self.router.resolve.named_objects(
            ctx, shape, init))
        vs.lost.pop(kind, None)
        if not req[5]:
            op.replayable = False
            op.why = "update data over replay_limit (on the data plane)"
        return [OK]

    async def adopt_update(self, ctx: ApplicationContext, req: list[Any]) -> list[Any]:
        """One update the member consumed of an operation handed over (DIRECT_ADOPT), as
        the record stage keeps one: its data, and its output's digest."""
        vs = ctx.sessions.get(req[1])
        shape = SHAPES.get(req[2]) if isinstance(req[2], int) else None
        if shape is None or shape.fn.op_role != "update" or not isinstance(req[3], bytes):
            return [CKR["CKR_ARGUMENTS_BAD"]]
        op = vs.ops.get(shape.fn.op_kind)
        if op is None:
            return [CKR["CKR_OPERATION_NOT_INITIALIZED"]]
        if not op.replayable:
            return [OK]
        op.size += len(req[3])
        limit = vs.group.config.replay_limit
        if op.size > limit:
            op.replayable, op.updates = False, []
            op.why = f"update data over replay_limit ({limit} bytes)"
            return [OK]
        has_out = shape.out_bytes is not None
        if has_out != (req[4] != 0) or (has_out and not isinstance(req[5], bytes)):
            return [CKR["CKR_ARGUMENTS_BAD"]]
        ureq = [req[2], req[1], req[3], *([req[4]] if has_out else [])]
        op.updates.append((ureq, req[5] if has_out else None))
        return [OK]

    async def unbind(self, ctx: ApplicationContext, req: list[Any]) -> list[Any]:
        vs = ctx.sessions.get(req[1])
        why = req[2]
        if why not in UNBIND_WHY:
            return [CKR["CKR_ARGUMENTS_BAD"]]
        binding = vs.direct
        if binding is None:
            if why != UNBIND_RETURNED:
                vs.left = None  # a connection broken, a call timed out: not vouched for
            # else: the helper refused the call, the daemon having ended the binding
            return [OK]
        member = binding.member
        if why == UNBIND_TIMEOUT and await self._hung(ctx, vs, binding):
            vs.left = None
            return [OK]
        await self.revoke(vs)
        # the client's call that failed may have reached the module: what it ran there
        # is sent again, not taken over as it runs (a LEAVING client adopted first)
        vs.left = None
        if why == UNBIND_RETURNED and await self._session_gone(ctx, vs, member):
            # the member lost the application's sessions (a reset): as a daemon call
            # that meets it, they are all rebuilt, and the object handles there looked
            # up again (a token object's handle ends with them)
            await self.router.failures.reset_member(ctx, member)
            return [OK]
        if why in (UNBIND_RETURNED, UNBIND_TIMEOUT) and not vs.objects and not vs.ops:
            # what the failed (or late) call left in the member session goes with it;
            # the next call opens a fresh one (session objects would be lost: kept then)
            await self.router.bind.close_on(ctx, vs, member)
        return [OK]

    async def _session_gone(self, ctx: ApplicationContext, vs: VirtualSession,
                            member: Member) -> bool:
        """Whether the member session a data-plane call fell back from is gone."""
        real = vs.real.get(member)
        if real is None:
            return False
        try:
            reply = await self.router.link.raw(ctx, member, [GET_SESSION_INFO, real, 0])
        except (MemberUnavailable, budget.CallExpired):
            return False  # its failure is handled where the call goes next
        return bool(reply[0] in SESSION_GONE)

    async def _hung(self, ctx: ApplicationContext, vs: VirtualSession, binding: Binding) -> bool:
        """A client says a data-plane call outlived call_timeout. Its word alone fails no
        member (DESIGN, invariant 3): the helper is asked how long its oldest direct
        call has been inside the module. Confirmed (or no answer from the helper within
        its own time-out), the member is hung: it is failed as a daemon call's time-out
        would fail it (helpers killed, recovery), and the call the client sends here
        next continues the timed-out one (its deadline, budget.py). Not confirmed:
        False, and the binding just ends."""
        member, helper = binding.member, binding.helper
        group = member.group
        timeout = budget.member_limit(group)
        vs.unbind()
        if not helper.alive:
            return False  # gone already (the member failed meanwhile, or was reset)
        try:
            stuck = await helper.direct_stuck(min(STUCK_QUERY, timeout))
        except CallTimedOut:
            stuck = timeout  # its own pipe is stuck too
        except MemberUnavailable:
            return False
        if stuck < HUNG_SHARE * timeout:
            log.info("%s: the client timed a data-plane call out on %s, whose helper has none "
                     "in flight that long; the binding ends", vs.describe(), member.name)
            await self._revoke(binding)
            return False
        why = f"a data-plane call exceeded its member's part of call_timeout ({timeout:.3g} s); helper killed"
        log.warning("%s: %s on %s", vs.describe(), why, member.name)
        now = time.monotonic()
        ctx.carried[vs.handle] = (now - stuck, now)
        helper.kill()
        self.router.failures.member_failed(member, CallTimedOut(member.name, why), "(data-plane call)")
        return True

    def member_back(self, member: Member) -> None:
        """A member is back in service (recovered, enabled after a drain). Bound
        sessions do not pass through the policy between their calls, so those the policy
        would now place elsewhere are unbound: their next calls go through the daemon,
        which places them (an operation the client ran on the data plane is handed over
        as it runs first, DIRECT_ADOPT, and the session moves at its end), and they bind
        again there.
        `failover`: sessions bound to members after this one; `balance`: all others."""
        group = member.group
        order = group.members.index(member)

        def elsewhere(bound: Member) -> bool:
            if group.config.policy == "failover":
                return group.members.index(bound) > order
            return bound is not member

        for ctx in list(self.router.daemon.contexts.values()):
            for vs in list(ctx.sessions.values()):
                if vs.group is group and vs.direct is not None and elsewhere(vs.direct.member):
                    task = asyncio.get_running_loop().create_task(self._move(ctx, vs))
                    self._moving.add(task)
                    task.add_done_callback(self._moving.discard)

    async def _move(self, ctx: ApplicationContext, vs: VirtualSession) -> None:
        binding = vs.direct
        if binding is None:
            return
        # its member session stays: it may run operations the client ran on the data
        # plane, which go on through the daemon (closed, they would have to be replayed,
        # which fails when their key was destroyed since)
        await self.revoke(vs)

    async def revoke(self, vs: VirtualSession) -> None:
        """The session's binding ends: its data-plane calls are refused from now on."""
        binding = vs.unbind()
        if binding is not None:
            await self._revoke(binding)

    async def _revoke(self, binding: Binding) -> None:
        helper = binding.helper
        if not helper.alive:
            return
        group = binding.member.group
        try:
            # a command of the helper, not of the module: a helper that cannot answer
            # it within the call's deadline is stuck, and killed
            await helper.call([FAST_REVOKE, binding.fast_id], max(0.05, budget.remaining(group)))
        except MemberUnavailable:
            pass  # gone: nothing is served any more
        except CKError:
            pass

    async def count_served(self) -> None:
        """Adds the calls the helpers served on the data plane to their members'
        counts (for status and metrics)."""
        await asyncio.gather(*(h.count_direct(m.health)
                               for ctx in list(self.router.daemon.contexts.values())
                               for m, h in ctx.live_helpers() if h.fast is not None))
