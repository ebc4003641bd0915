"""The record stage: what a call changed, kept so the session can be rebuilt elsewhere:
objects it made (with their recipes and sources), the handles a find returned, the
operations it started, continued or ended (with update data up to replay_limit), and
which random keys have shown their bits.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from p11p.daemon.context import ApplicationContext
from p11p.daemon.members import Member, MemberState
from p11p.daemon.policy import BUFFER_TOO_SMALL, Operation, operation_change
from p11p.daemon.shapes import GENERATING, OK, CallShape, Reply, digest, reveals
from p11p.daemon.virtual import FindState, Recipe, VirtualObject, VirtualSession

if TYPE_CHECKING:
    from p11p.daemon.router import Router

log = logging.getLogger("p11p.ha")


class Recorder:
    def __init__(self, router: Router) -> None:
        self.r = router

    async def record(self, ctx: ApplicationContext, vs: VirtualSession, member: Member,
                     shape: CallShape, vreq: list[Any], reply: Reply) -> None:
        rv = reply[0]
        name = shape.fn.name
        named = self.r.resolve.named_objects(ctx, shape, vreq)
        if rv == OK and shape.fn.writes == "set":
            for vobj in named.values():
                if not vobj.is_token:
                    vobj.edits.append(vreq[3])  # made again with the object
        if rv == OK and shape.created:
            made: list[VirtualObject | None] = []
            for j in shape.created:
                if isinstance(reply[j], int):
                    vobj = await self.r.resolve.object_from(ctx, vs, member, reply[j], created=True)
                    reply[j] = vobj.handle
                    made.append(vobj)
                else:
                    made.append(None)
            self.r.daemon.audit.created(ctx, vs.group, name, made, member, named.values())
            if shape.fn.writes == "copy" and any(m is not None and m.is_token for m in made):
                # a token copy keeps the source's bits where no failover remakes them:
                # a random source made again elsewhere would be another key than it
                for vobj in named.values():
                    vobj.used = True
            recipe = Recipe(list(vreq), made, name in GENERATING, named)
            for new in made:
                if new is None:
                    continue
                if new.is_token:
                    if new.identity is not None:
                        vs.group.destroyed.discard(new.identity)
                        vs.group.written += 1
                    if len(vs.group.members) > 1 and vs.group.config.write_policy == "primary":
                        # on this member only (write_policy "all" writes it on each)
                        new.home = member
                        if new.identity is not None:
                            vs.group.homes[new.identity] = member
                else:
                    new.recipe, new.owner = recipe, vs
                    vs.objects.add(new)
        if rv == OK and reveals(shape, vreq):
            # its bits have shown (the objects it made are known, so the reply goes to the
            # application): a random key is not remade now. Not before: a member that
            # fails as the objects are read back leaves the key unused, to be made again
            # where the call goes next
            for vobj in named.values():
                vobj.used = True
        if shape.found is not None and rv == OK and isinstance(reply[shape.found], list):
            handles = [(await self.r.resolve.object_from(ctx, vs, member, h, created=False)).handle
                       for h in reply[shape.found]]
            reply[shape.found] = handles
            if vs.find is not None:
                vs.find.returned += handles
        if shape.fn.op_kind == "find" and shape.fn.op_role == "init" and rv == OK:
            vs.find = FindState(vreq[2])
        elif shape.fn.op_kind == "find" and shape.fn.op_role == "final" and rv == OK:
            vs.find = None
        self.record_operation(vs, shape, vreq, reply, named)
        fn = shape.fn
        if (rv not in (OK, BUFFER_TOO_SMALL) and fn.op_kind and fn.op_kind != "find"
                and fn.op_role in ("update", "final", "oneshot") and not fn.opaque
                and member in vs.real):
            # the error ended the operation (§5.2), in p11p's view as in the token's; a
            # module that keeps it (SoftHSM2 does for some, and an error a fault put in its
            # place never reached it) would let the next call of it succeed: ended there
            await self.r.bind.end_stale(ctx, member, vs.real[member], [fn.op_kind])
        if vs.member is not None and vs.member.health.state is MemberState.DRAINING and vs.idle:
            await self.r.bind.close_on(ctx, vs, vs.member)
            vs.member = None

    @staticmethod
    def ended(vs: VirtualSession, shape: CallShape) -> None:
        """A call that continues or ends an operation got an error from p11p itself."""
        fn = shape.fn
        if fn.op_kind and fn.op_role in ("update", "final", "oneshot") and not fn.opaque:
            vs.ops.pop(fn.op_kind, None)

    def record_operation(self, vs: VirtualSession, shape: CallShape, vreq: list[Any],
                         reply: Reply, named: dict[int, VirtualObject]) -> None:
        requested = shape.out_bytes is None or vreq[shape.out_bytes] is not None
        change = operation_change(shape.fn.name, reply[0], requested)
        if change.start is not None:
            vs.ops[change.start] = Operation(list(vreq), keys=named)
            self.r.daemon.audit.operation(vs, change.start, shape, vreq)  # a key used
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
            op.updates.append((ureq, digest(out)))
        elif change.end is not None:
            vs.ops.pop(change.end, None)
        elif change.opaque:
            for kind, op in vs.ops.items():
                if op.replayable:
                    op.replayable, op.updates = False, []
                    op.why = f"{shape.fn.name} is not replayed by p11p"
                    log.warning("session potentially not recoverable: %s: %s operation: %s",
                                vs.describe(), kind, op.why)
