"""A changed group file applied to the running group, sessions kept (`p11p reload`).

Settings (timeouts, policy, weights, recovery, probes, limits, CK_RV classes) take effect
at the next call. A member added comes into service (or into recovery); a member removed
leaves as in a failover: its sessions move to the others at their next call, with
replay, and whatever only it held is lost as when a member fails for good. A member whose
module, token, environment or slot changed is removed and added again under its name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

from p11p.daemon.config import GroupConfig, MemberConfig
from p11p.daemon.errors import class_table
from p11p.daemon.members import Group, Member, MemberState

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.daemon")


def same_token(a: MemberConfig, b: MemberConfig) -> bool:
    """Whether two member settings name the same token the same way (weight aside)."""
    return dataclasses.replace(a, weight=b.weight) == b


async def apply(daemon: Daemon, group: Group, gc: GroupConfig) -> list[str]:
    """Makes `group` run as `gc` says; returns what changed, for the log."""
    changes = [f.name for f in dataclasses.fields(gc)
               if f.name != "members" and getattr(gc, f.name) != getattr(group.config, f.name)]
    old = {m.name: m for m in group.members}
    members: list[Member] = []
    added: list[Member] = []
    for mc in gc.members:
        member = old.get(mc.name)
        if member is not None and same_token(member.config, mc):
            del old[mc.name]
            if member.config.weight != mc.weight:
                changes.append(f"{mc.name}.weight")
            member.config = mc
        else:
            member = Member(mc, group, daemon.config.helper_pool, daemon.config.max_frame)
            member.on_helper_death = daemon.member_helper_died
            added.append(member)
        members.append(member)
    removed = list(old.values())
    group.config = gc
    group.rv_classes = class_table(gc.rv_classes)
    await asyncio.gather(*(m.start() for m in added))
    # the new list first: calls that leave a removed member are placed among these
    group.members = members
    for member in removed:
        await retire(daemon, member)
        changes.append(f"member {member.name} removed")
    for member in added:
        changes.append(f"member {member.name} added ({member.health.state.name})")
        if member.health.state is MemberState.FAILED:
            daemon.recovery.start(member)
    if not gc.direct_calls:
        for ctx in daemon.contexts.values():
            for vs in ctx.sessions.values():
                if vs.group is group and vs.direct is not None:
                    await daemon.direct.revoke(vs)
    for member in members:  # an added member, or standby_logins turned on
        daemon.standby.member_back(member)
    group.compare_keysets()
    group.notify()
    daemon.slot_event(group)
    return changes


async def retire(daemon: Daemon, member: Member) -> None:
    """A member left the group: out of rotation for good, its sessions moved on."""
    member.mark(MemberState.DISABLED, why="removed from the configuration")
    task = daemon.recovery.tasks.pop(member, None)
    if task is not None:
        task.cancel()
    group = member.group
    for ctx in list(daemon.contexts.values()):
        ctx.forget_member(member)  # its helper goes; the sessions are rebuilt elsewhere
        for vobj in ctx.objects.values():
            if vobj.home is member:
                vobj.home = None
            vobj.missing.discard(member)
    for identity in [i for i, m in group.homes.items() if m is member]:
        del group.homes[identity]
    group.destroyed_while_out.pop(member, None)
    group.written += 1
    await member.stop()
    log.warning("member removed: group=%s member=%s", group.label, member.name)
