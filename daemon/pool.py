"""A member's helpers: the warm pool (helpers started, module initialised, not logged
in, so that an application's first call does not wait for a process to start), the
helpers p11p borrows for itself, and the recycling of an ended application's helpers
for the next application."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
from typing import TYPE_CHECKING

from p11p.daemon import budget
from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.helperproc import (
    RECYCLE,
    START_TIMEOUT,
    CallTimedOut,
    HelperLimit,
    HelperProcess,
)
from p11p.daemon.shapes import CODE
from p11p.protocol.constants import CKR, CKS, rv_name

if TYPE_CHECKING:
    from p11p.daemon.members import Member

log = logging.getLogger("p11p.member")

_POOL_TRIES, _POOL_RETRY = 5, 1.0  # warm-pool starts that fail, and the pause between
_TOKEN_CHECKS = 3  # helpers started before a member is declared unavailable for a missing token
# A helper whose application ended serves the next one (HelperPool.recycle) up to this
# many applications in all (what a module leaks per application stays bounded); the warm
# pool refills that long after an application took a helper from it (a short-lived one
# gives its helper back meanwhile, and no helper starts).
RECYCLE_USES = 64
_REFILL_DELAY = 0.5
NOBODY_UID = 0xFFFFFFFF  # (uid_t)-1: no process has it (a recycled helper's listener)


class HelperPool:
    """The helpers of one member."""

    def __init__(self, member: Member, size: int, max_frame: int) -> None:
        self.member = member
        self.size = size
        self.max_frame = max_frame
        self.warm: list[HelperProcess] = []
        self.epoch = 0  # bumped when the pool is discarded: older starts do not join
        self._refill: asyncio.Task[None] | None = None
        self._stopped = False  # the group ended (stop): no helper joins the pool

    @property
    def where(self) -> str:
        return f"group={self.member.group.label} member={self.member.name}"

    async def new(self, probing: bool = False, deadline: float | None = None) -> HelperProcess:
        """A started helper. Once the member's slot is known (not `probing`), one that
        does not see the token there is replaced: a module instance can miss a token it
        read while another instance was writing it (SoftHSM2's file store does), and
        would answer that application CKR_SLOT_ID_INVALID for as long as it lives.
        `deadline` (monotonic): the application call's, which every wait here draws
        from (DESIGN, invariant 2); without one, START_TIMEOUT and call_timeout."""
        def left(default: float) -> float:
            return default if deadline is None else deadline - time.monotonic()

        member = self.member
        epoch = self.epoch
        for attempt in range(_TOKEN_CHECKS):
            given = left(START_TIMEOUT)
            if given <= 0:
                raise budget.CallExpired()
            try:
                helper = await HelperProcess.start(member.name, member.config.module,
                                                   member.config.env, self.max_frame, given)
            except CallTimedOut:
                if deadline is not None and not budget.fair(given, member.group):
                    raise budget.CallExpired() from None  # the call's time, not the member's
                raise
            log.debug("%s new helper pid=%d%s", self.where, helper.pid,
                      " (probe)" if probing else "")
            if probing or member.slot_id is None:
                break
            given = left(member.group.config.call_timeout)
            try:
                rv, _ = await helper.call([CODE["C_GetTokenInfo"], member.slot_id, 0], given)
            except BaseException as exc:
                await helper.stop()
                if isinstance(exc, CallTimedOut) and deadline is not None \
                        and not budget.fair(given, member.group):
                    raise budget.CallExpired() from None
                raise
            if rv == CKR["CKR_OK"]:
                break
            await helper.stop()
            log.warning("%s new helper does not see the token in slot %s: %s",
                        self.where, member.slot_id, rv_name(rv))
            if attempt + 1 == _TOKEN_CHECKS:
                raise MemberUnavailable(member.name, f"C_GetTokenInfo: {rv_name(rv)}", rv)
            await asyncio.sleep(0.05 * (attempt + 1))
        helper.on_death = member.helper_died
        helper.pool_epoch = epoch
        return helper

    async def take(self, deadline: float | None = None) -> HelperProcess:
        """A started helper for one application context (warm if one is ready),
        started within `deadline` (the application call's) when none is."""
        while self.warm:
            helper = self.warm.pop()
            if helper.alive:
                self._schedule_refill(_REFILL_DELAY)
                helper.uses += 1
                return helper
        helper = await self.new(deadline=deadline)
        self._schedule_refill(_REFILL_DELAY)
        helper.uses += 1
        return helper

    def _schedule_refill(self, delay: float = 0.0) -> None:
        if self.size and (self._refill is None or self._refill.done()):
            # a task of its own, outside the application call that scheduled it (whose
            # deadline it must not take along)
            self._refill = asyncio.get_running_loop().create_task(
                self._fill(delay), context=contextvars.Context())

    async def _fill(self, delay: float = 0.0) -> None:
        # after an application took a warm helper, a while first: a short-lived one gives
        # it back meanwhile (recycle), and no helper needs to start
        await asyncio.sleep(delay)
        failures = 0
        while len(self.warm) < self.size and self.member.health.usable:
            epoch = self.epoch
            try:
                helper = await self.new()
            except HelperLimit:
                return
            except MemberUnavailable as exc:
                failures += 1
                log.warning("%s warm helper failed (%d): %s", self.where, failures, exc)
                if failures >= _POOL_TRIES:
                    return  # the member's health decides now; recovery refills it
                await asyncio.sleep(_POOL_RETRY)
                continue
            if epoch != self.epoch or not self.member.health.usable \
                    or len(self.warm) >= self.size:
                # the member failed while it started (and may be back already): its pool
                # was discarded, and this helper, started before, would stay there
                # beyond the pool's size, as many as the member failed (invariant 4)
                await helper.stop()
                return
            self.warm.append(helper)

    async def borrow(self) -> tuple[HelperProcess, int]:
        """A warm helper (else a new one) for p11p's own use (a health probe), and the
        pool's epoch, to give it back with give_back."""
        epoch = self.epoch
        while self.warm:
            helper = self.warm.pop()
            if helper.alive:
                return helper, epoch
        return await self.new(), epoch

    def give_back(self, helper: HelperProcess, epoch: int) -> None:
        """A borrowed helper back into the warm pool, or stopped when the pool is full
        or was discarded meanwhile (the member failed: its module instance may be broken)."""
        if helper.alive and self.member.health.usable and epoch == self.epoch \
                and len(self.warm) < self.size:
            self.warm.append(helper)
        else:
            asyncio.get_running_loop().create_task(helper.stop(), context=contextvars.Context())

    async def recycle(self, helper: HelperProcess) -> None:
        """A helper whose application ended: back into the warm pool, for the next
        application, when it served no more than RECYCLE_USES, its module instance is
        the member's current one (no failure since it started), the pool has room, and it
        is clean: every session of the slot closed (which ends the login and the session
        objects, PKCS#11 §5.6), a new session public, its data plane's listener handed
        to no one (fast.c: the ended application's connections and bindings end).
        Otherwise, or when anything of that fails, it ends as before."""
        timeout = self.member.group.config.call_timeout
        try:
            if self._recyclable(helper) and await self._clean(helper, timeout) \
                    and self._recyclable(helper):
                self.warm.append(helper)
                return
        except Exception as exc:  # whatever went wrong, it ends
            # a call that timed out killed it: not the member's failure (it was ending)
            log.debug("%s helper pid=%d not kept: %r", self.where, helper.pid, exc)
        await helper.stop()

    def _recyclable(self, helper: HelperProcess) -> bool:
        return (helper.alive and not helper.stopping and helper.in_flight == 0
                and helper.uses < RECYCLE_USES and helper.pool_epoch == self.epoch
                and self.member.placeable and self.member.slot_id is not None
                and not self._stopped and len(self.warm) < self.size)

    async def _clean(self, helper: HelperProcess, timeout: float) -> bool:
        """One RECYCLE request (helper/loop.py): it is no longer adoptable, its data
        plane listens anew for nobody (the ended application's connections close and its
        bindings end), every session of the slot closes, and a new session is public."""
        slot = self.member.slot_id
        helper.adopt = None
        name = b""
        if helper.fast_name is not None:
            if helper.fast_started is not None and not helper.fast_started.done():
                return False
            name = helper.fast_name
        reply = await helper.call([RECYCLE, slot, name, secrets.token_bytes(16), NOBODY_UID],
                                  timeout)
        if name:
            helper.fast, helper.fast_started = None, None
        if reply[0] != CKR["CKR_OK"]:
            log.debug("%s helper pid=%d not kept: RECYCLE returned %s", self.where,
                      helper.pid, rv_name(reply[0]))
            return False
        state = reply[1] if len(reply) >= 2 else None
        if state not in (CKS["CKS_RO_PUBLIC_SESSION"], CKS["CKS_RW_PUBLIC_SESSION"]):
            log.warning("%s a helper's new session after C_CloseAllSessions "
                        "is not public (state %s): it ends with its application",
                        self.where, state)
            return False
        return True

    def discard(self) -> None:
        """Drops the warm helpers (their module instance may be broken too)."""
        self.epoch += 1
        warm, self.warm = self.warm, []
        for helper in warm:
            helper.kill()

    def start_with(self, helper: HelperProcess) -> None:
        """The member's first helper (its probe's) is the pool's first; the rest start in
        the background."""
        self.warm.append(helper)
        self._schedule_refill()

    def add_warm(self, helper: HelperProcess) -> None:
        """A helper of the member's new module instance (recovery's probe) is the pool;
        helpers started before go."""
        self.discard()
        helper.pool_epoch = self.epoch
        self.warm.append(helper)
        self._schedule_refill()

    async def stop(self) -> None:
        self._stopped = True
        if self._refill is not None:
            self._refill.cancel()
        warm, self.warm = self.warm, []
        await asyncio.gather(*(h.stop() for h in warm), return_exceptions=True)
