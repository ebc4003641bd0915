"""Recovery of failed members: one task per member, the Luna HA model.

Every `recovery.interval` the task starts a fresh helper (so C_Finalize/C_Initialize
happen in a new process), finds the token, reads its key set and compares it with the
group's, runs the group's health probe (health.py) when probes are on, and puts the
member back in rotation; not before its hold-out, when it failed again soon after it
last returned. It gives up after `recovery.attempts` tries (0: never). Application contexts get new helpers for the member as they use it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from p11p.daemon import health
from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.helperproc import HelperLimit, HelperProcess
from p11p.daemon.members import Member, MemberState

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.recovery")


class Recovery:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.tasks: dict[Member, asyncio.Task[None]] = {}

    def start(self, member: Member, at_once: bool = False) -> None:
        task = self.tasks.get(member)
        if task is None or task.done():
            self.tasks[member] = asyncio.create_task(self._run(member, at_once))

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _run(self, member: Member, at_once: bool) -> None:
        group = member.group
        attempt = 0
        while True:
            cfg = group.config.recovery  # as it is now: a reload applies at the next attempt
            if cfg.attempts and attempt >= cfg.attempts:
                break
            await asyncio.sleep(0 if at_once and not attempt else cfg.interval)
            # a member that failed again soon after it returned is held out longer
            # (health.hold_out) while another member takes new work: no longer once none
            # does (drained, failed), which would hold the whole token out; `p11p member
            # enable` (at_once) does not wait for it
            while not at_once and health.takes_work_elsewhere(member) and \
                    (left := member.health.held_until - time.monotonic()) > 0:
                await group.wait_change(left)
            if member.health.state in (MemberState.DISABLED, MemberState.OK):
                return
            attempt += 1
            member.health.attempt = attempt
            member.mark(MemberState.RECOVERING)
            try:
                helper = await member.helpers.new(probing=True)
                try:
                    await member.probe(helper)
                    if group.config.health.interval > 0:  # the probe the member fails by
                        member.health.probe_latency = await health.probe(member, helper)
                        member.health.probe_at, member.health.probe_error = time.monotonic(), ""
                    complete = await self.daemon.sync.sync(member, helper)  # write_policy all
                except BaseException:
                    await helper.stop()
                    raise
            except HelperLimit:
                member.health.last_error = "max_helpers reached"
                continue
            except MemberUnavailable as exc:
                member.health.last_error = str(exc)
                member.health.last_rv = exc.rv
                log.info("recovery attempt %d%s failed: group=%s member=%s (%s)", attempt,
                         f"/{cfg.attempts}" if cfg.attempts else "", group.label, member.name, exc)
                continue
            if member.health.state is not MemberState.RECOVERING:  # disabled meanwhile
                await helper.stop()
                return
            if not complete:
                # its private objects are compared at the next login (sync.py): it takes
                # no call before
                await helper.stop()
                member.health.last_error = ("waiting for an application to log in: private "
                                            "objects to compare (write_policy all)")
                return
            self.put_back(member, helper, attempt)
            return
        member.mark(MemberState.DISABLED)
        log.error("member recovery gave up: group=%s member=%s after %d attempts; "
                  "'p11p member enable' puts it back",
                  group.label, member.name, attempt)

    def put_back(self, member: Member, helper: HelperProcess, attempt: int) -> None:
        """The member returns to service, `helper` (its new module instance) as its warm
        pool."""
        group = member.group
        was_out = not group.present
        member.helpers.add_warm(helper)
        member.mechanism_answers.clear()
        member.mark(MemberState.OK)
        member.health.attempt = 0
        member.health.returned_at = time.monotonic()
        group.metrics.recoveries += 1
        log.warning("member recovered: group=%s member=%s slot=%s after %d attempt(s)",
                    group.label, member.name, member.slot_id, attempt)
        group.compare_keysets()
        self.daemon.direct.member_back(member)
        self.daemon.standby.member_back(member)  # logged-in applications log in there
        if was_out:
            log.warning("group restored: group=%s", group.label)
            self.daemon.slot_event(group)
        group.notify()
