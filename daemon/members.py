"""Groups and their members: the real tokens behind each virtual token.

A Member knows its module, how to find its token (label or serial), its real slot id,
its health, and keeps a small pool of warm helpers (started, module initialised, not
logged in) so that an application's first call does not wait for a process to start.
A Group is what the application sees as one token; it owns its members in priority
order and its virtual slot id.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from p11p.daemon import audit, budget
from p11p.daemon.config import GroupConfig, MemberConfig
from p11p.daemon.errors import MemberUnavailable, RvClass, class_table
from p11p.daemon.helperproc import (
    FAST_START,
    START_TIMEOUT,
    CallTimedOut,
    HelperLimit,
    HelperProcess,
)
from p11p.daemon.metrics import GroupMetrics, MemberMetrics
from p11p.daemon.virtual import CKA_TOKEN, IDENTITY_TEMPLATE, ObjectIdentity, identity_from_values
from p11p.protocol.constants import CKF, CKR, CKS, rv_name
from p11p.protocol.spec import by_name

log = logging.getLogger("p11p.member")

_GET_SLOT_LIST = by_name()["C_GetSlotList"].code
_GET_TOKEN_INFO = by_name()["C_GetTokenInfo"].code
_GET_MECH_LIST = by_name()["C_GetMechanismList"].code
_OPEN_SESSION = by_name()["C_OpenSession"].code
_CLOSE_SESSION = by_name()["C_CloseSession"].code
_CLOSE_ALL_SESSIONS = by_name()["C_CloseAllSessions"].code
_GET_SESSION_INFO = by_name()["C_GetSessionInfo"].code
_FIND_INIT = by_name()["C_FindObjectsInit"].code
_FIND = by_name()["C_FindObjects"].code
_FIND_FINAL = by_name()["C_FindObjectsFinal"].code
_GET_ATTRIBUTE_VALUE = by_name()["C_GetAttributeValue"].code
_POOL_TRIES, _POOL_RETRY = 5, 1.0  # warm-pool starts that fail, and the pause between
_TOKEN_CHECKS = 3  # helpers started before a member is declared unavailable for a missing token
# A helper whose application ended serves the next one (Member.recycle) up to this many
# applications in all (what a module leaks per application stays bounded); the warm pool
# refills that long after an application took a helper from it (a short-lived one gives
# its helper back meanwhile, and no helper starts).
RECYCLE_USES = 64
_REFILL_DELAY = 0.5
NOBODY_UID = 0xFFFFFFFF  # (uid_t)-1: no process has it (a recycled helper's listener)


async def close_probe_session(helper: HelperProcess, member: str, slot: int, session: int,
                              timeout: float) -> None:
    """Closes a session p11p opened on a helper that may join the warm pool. One left
    open would keep the module logged in for the application given that helper after
    its own last session (PKCS#11 §5.6): refused, every session of the slot is closed;
    refused again, the member is not usable (MemberUnavailable)."""
    rv = (await helper.call([_CLOSE_SESSION, session], timeout))[0]
    if rv in (CKR["CKR_OK"], CKR["CKR_SESSION_HANDLE_INVALID"]):
        return
    log.warning("member=%s C_CloseSession of a probe session returned %s: closing every "
                "session of the slot", member, rv_name(rv))
    rv = (await helper.call([_CLOSE_ALL_SESSIONS, slot], timeout))[0]
    if rv != CKR["CKR_OK"]:
        raise MemberUnavailable(member, f"C_CloseAllSessions: {rv_name(rv)}", rv)


class MemberState(Enum):
    OK = "OK"
    FAILED = "FAILED"
    RECOVERING = "RECOVERING"
    DRAINING = "DRAINING"
    DISABLED = "DISABLED"


@dataclass
class MemberHealth:
    state: MemberState = MemberState.RECOVERING
    last_rv: int | None = None
    last_error: str = ""
    since: float = field(default_factory=time.monotonic)
    attempt: int = 0
    calls_served: int = 0
    bound: int = 0  # sessions bound to the data plane (daemon/direct.py)
    direct_served: int = 0  # of calls_served, those served on the data plane
    calls_in_flight: int = 0
    # health probes (daemon/health.py): the last one's time (monotonic), latency,
    # outcome; and the hold-out of a member that fails again soon after it returned
    probe_at: float | None = None
    probe_latency: float = 0.0
    probe_error: str = ""
    returned_at: float | None = None  # when recovery last put it back in service
    holdout: float = 0.0  # its last hold-out (seconds); doubles while it flaps
    held_until: float = 0.0  # recovery does not put it back before (monotonic)

    @property
    def usable(self) -> bool:
        return self.state in (MemberState.OK, MemberState.DRAINING)


def _pad32(text: str) -> bytes:
    raw = text.encode()[:32]
    return raw + b" " * (32 - len(raw))


class Member:
    """One real token in a group."""

    def __init__(self, config: MemberConfig, group: Group, pool_size: int, max_frame: int) -> None:
        self.config = config
        self.name = config.name
        self.group = group
        self.slot_id: int | None = None
        self.mechanisms: list[int] = []
        self.token_label = b""
        self.token_flags = 0  # CK_TOKEN_INFO.flags when the token was found
        self.keyset: frozenset[ObjectIdentity] = frozenset()
        self.health = MemberHealth()
        self._pool_size = pool_size
        self._max_frame = max_frame
        self._warm: list[HelperProcess] = []
        self._pool_epoch = 0  # bumped when the pool is discarded: older starts do not join
        self.on_helper_death: Callable[[Member, str], None] | None = None
        self.metrics = MemberMetrics()
        # C_GetMechanismList/Info answers (CKR_OK) by request: a token's mechanisms do
        # not change while it serves; forgotten when the member recovers (it may come
        # back as another device)
        self.mechanism_answers: dict[tuple[Any, ...], list[Any]] = {}
        self._refill: asyncio.Task[None] | None = None
        self._stopped = False  # the group ended (Member.stop): no helper joins the pool

    def __repr__(self) -> str:
        return f"<Member {self.group.label}/{self.name}>"

    # -- what the policy sees ---------------------------------------------------------

    @property
    def placeable(self) -> bool:
        return self.health.state is MemberState.OK

    @property
    def usable(self) -> bool:
        return self.health.usable

    @property
    def load(self) -> float:
        # a session bound to the data plane counts as one call always in flight: its
        # calls do not pass here
        return (self.health.calls_in_flight + self.health.bound) / self.config.weight

    # -- helpers ----------------------------------------------------------------------

    async def new_helper(self, probing: bool = False,
                         deadline: float | None = None) -> HelperProcess:
        """A started helper. Once the member's slot is known (not `probing`), one that
        does not see the token there is replaced: a module instance can miss a token it
        read while another instance was writing it (SoftHSM2's file store does), and
        would answer that application CKR_SLOT_ID_INVALID for as long as it lives.
        `deadline` (monotonic): the application call's, which every wait here draws
        from (DESIGN, invariant 2); without one, START_TIMEOUT and call_timeout."""
        def left(default: float) -> float:
            return default if deadline is None else deadline - time.monotonic()

        epoch = self._pool_epoch
        for attempt in range(_TOKEN_CHECKS):
            given = left(START_TIMEOUT)
            if given <= 0:
                raise budget.CallExpired()
            try:
                helper = await HelperProcess.start(self.name, self.config.module,
                                                   self.config.env, self._max_frame, given)
            except CallTimedOut:
                if deadline is not None and not budget.fair(given, self.group):
                    raise budget.CallExpired() from None  # the call's time, not the member's
                raise
            log.debug("group=%s member=%s new helper pid=%d%s", self.group.label, self.name,
                      helper.pid, " (probe)" if probing else "")
            if probing or self.slot_id is None:
                break
            given = left(self.group.config.call_timeout)
            try:
                rv, _ = await helper.call([_GET_TOKEN_INFO, self.slot_id, 0], given)
            except BaseException as exc:
                await helper.stop()
                if isinstance(exc, CallTimedOut) and deadline is not None \
                        and not budget.fair(given, self.group):
                    raise budget.CallExpired() from None
                raise
            if rv == CKR["CKR_OK"]:
                break
            await helper.stop()
            log.warning("group=%s member=%s new helper does not see the token in slot %s: %s",
                        self.group.label, self.name, self.slot_id, rv_name(rv))
            if attempt + 1 == _TOKEN_CHECKS:
                raise MemberUnavailable(self.name, f"C_GetTokenInfo: {rv_name(rv)}", rv)
            await asyncio.sleep(0.05 * (attempt + 1))
        helper.on_death = self._helper_died
        helper.pool_epoch = epoch
        return helper

    def _helper_died(self, why: str) -> None:
        """A helper exited by itself (crash, kill): the member is failed (DESIGN)."""
        if self.on_helper_death is not None:
            self.on_helper_death(self, why)

    async def take_helper(self, deadline: float | None = None) -> HelperProcess:
        """A started helper for one application context (warm if one is ready),
        started within `deadline` (the application call's) when none is."""
        while self._warm:
            helper = self._warm.pop()
            if helper.alive:
                self._schedule_refill(_REFILL_DELAY)
                helper.uses += 1
                return helper
        helper = await self.new_helper(deadline=deadline)
        self._schedule_refill(_REFILL_DELAY)
        helper.uses += 1
        return helper

    def _schedule_refill(self, delay: float = 0.0) -> None:
        if self._pool_size and (self._refill is None or self._refill.done()):
            # a task of its own, outside the application call that scheduled it (whose
            # deadline it must not take along)
            self._refill = asyncio.get_running_loop().create_task(
                self._fill_pool(delay), context=contextvars.Context())

    async def _fill_pool(self, delay: float = 0.0) -> None:
        # after an application took a warm helper, a while first: a short-lived one gives
        # it back meanwhile (recycle), and no helper needs to start
        await asyncio.sleep(delay)
        failures = 0
        while len(self._warm) < self._pool_size and self.health.usable:
            epoch = self._pool_epoch
            try:
                helper = await self.new_helper()
            except HelperLimit:
                return
            except MemberUnavailable as exc:
                failures += 1
                log.warning("group=%s member=%s warm helper failed (%d): %s", self.group.label,
                            self.name, failures, exc)
                if failures >= _POOL_TRIES:
                    return  # the member's health decides now; recovery refills it
                await asyncio.sleep(_POOL_RETRY)
                continue
            if epoch != self._pool_epoch or not self.health.usable \
                    or len(self._warm) >= self._pool_size:
                # the member failed while it started (and may be back already): its pool
                # was discarded, and this helper, started before, would stay there
                # beyond the pool's size, as many as the member failed (invariant 4)
                await helper.stop()
                return
            self._warm.append(helper)

    async def borrow_helper(self) -> tuple[HelperProcess, int]:
        """A warm helper (else a new one) for p11p's own use (a health probe), and the
        pool's epoch, to give it back with give_back."""
        epoch = self._pool_epoch
        while self._warm:
            helper = self._warm.pop()
            if helper.alive:
                return helper, epoch
        return await self.new_helper(), epoch

    def give_back(self, helper: HelperProcess, epoch: int) -> None:
        """A borrowed helper back into the warm pool, or stopped when the pool is full
        or was discarded meanwhile (the member failed: its module instance may be broken)."""
        if helper.alive and self.health.usable and epoch == self._pool_epoch \
                and len(self._warm) < self._pool_size:
            self._warm.append(helper)
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
        timeout = self.group.config.call_timeout
        try:
            if self._recyclable(helper) and await self._clean(helper, timeout) \
                    and self._recyclable(helper):
                self._warm.append(helper)
                return
        except Exception as exc:  # whatever went wrong, it ends
            # a call that timed out killed it: not the member's failure (it was ending)
            log.debug("group=%s member=%s helper pid=%d not kept: %r", self.group.label,
                      self.name, helper.pid, exc)
        await helper.stop()

    def _recyclable(self, helper: HelperProcess) -> bool:
        return (helper.alive and not helper.stopping and helper.in_flight == 0
                and helper.uses < RECYCLE_USES and helper.pool_epoch == self._pool_epoch
                and self.health.state is MemberState.OK and self.slot_id is not None
                and not self._stopped and len(self._warm) < self._pool_size)

    async def _clean(self, helper: HelperProcess, timeout: float) -> bool:
        slot = self.slot_id
        if helper.fast_name is not None:
            if helper.fast_started is not None and not helper.fast_started.done():
                return False
            # first, nobody's token and uid: the ended application's connections close
            # and its bindings end
            reply = await helper.call([FAST_START, helper.fast_name, secrets.token_bytes(16),
                                       NOBODY_UID], timeout)
            if reply[0] != CKR["CKR_OK"]:
                return False
            helper.fast, helper.fast_started = None, None
        if (await helper.call([_CLOSE_ALL_SESSIONS, slot], timeout))[0] != CKR["CKR_OK"]:
            return False
        rv, session = (await helper.call([_OPEN_SESSION, slot, 4, 0], timeout))[:2]
        if rv != CKR["CKR_OK"]:
            return False
        rv, info = (await helper.call([_GET_SESSION_INFO, session, 0], timeout))[:2]
        state = info[1] if rv == CKR["CKR_OK"] and isinstance(info, list) and len(info) >= 2 \
            else None
        public = state in (CKS["CKS_RO_PUBLIC_SESSION"], CKS["CKS_RW_PUBLIC_SESSION"])
        if not public:
            log.warning("group=%s member=%s a helper's new session after C_CloseAllSessions "
                        "is not public (%s, state %s): it ends with its application",
                        self.group.label, self.name, rv_name(rv), state)
        rv = (await helper.call([_CLOSE_SESSION, session], timeout))[0]
        return public and rv == CKR["CKR_OK"]

    def discard_pool(self) -> None:
        """Drops the warm helpers (their module instance may be broken too)."""
        self._pool_epoch += 1
        warm, self._warm = self._warm, []
        for helper in warm:
            helper.kill()

    def add_warm(self, helper: HelperProcess) -> None:
        """A helper of the member's new module instance (recovery's probe) is the pool;
        helpers started before go."""
        self.discard_pool()
        helper.pool_epoch = self._pool_epoch
        self._warm.append(helper)
        self._schedule_refill()

    async def stop(self) -> None:
        self._stopped = True
        if self._refill is not None:
            self._refill.cancel()
        warm, self._warm = self._warm, []
        await asyncio.gather(*(h.stop() for h in warm), return_exceptions=True)

    # -- probing ----------------------------------------------------------------------

    async def probe(self, helper: HelperProcess) -> None:
        """Finds the member's slot by token label or serial; reads its mechanisms."""
        rv, count = await helper.call([_GET_SLOT_LIST, 1, None], 10.0)
        if rv != CKR["CKR_OK"]:
            raise MemberUnavailable(self.name, f"C_GetSlotList: {rv_name(rv)}", rv)
        rv, slots = await helper.call([_GET_SLOT_LIST, 1, count], 10.0)
        if rv != CKR["CKR_OK"]:
            raise MemberUnavailable(self.name, f"C_GetSlotList: {rv_name(rv)}", rv)
        cfg = self.config
        want_label = _pad32(cfg.token) if cfg.token is not None else None
        for slot in slots:
            if cfg.slot is not None and slot != cfg.slot:
                continue
            rv, info = await helper.call([_GET_TOKEN_INFO, slot, 0], 10.0)
            if rv != CKR["CKR_OK"]:
                continue
            label = info[0]

            def text(raw: bytes) -> str:
                return raw.decode(errors="replace").rstrip(" \0")

            if want_label is not None and label != want_label:
                continue
            if cfg.serial is not None and text(info[3]) != cfg.serial:
                continue
            if cfg.manufacturer is not None and text(info[1]) != cfg.manufacturer:
                continue
            if cfg.model is not None and text(info[2]) != cfg.model:
                continue
            rv, mechs = await helper.call([_GET_MECH_LIST, slot, 4096], 10.0)
            self.mechanisms = mechs if rv == CKR["CKR_OK"] else []
            self.slot_id = slot
            self.token_label = label
            self.token_flags = info[4] if isinstance(info[4], int) else 0
            self.keyset = await self._read_keyset(helper, slot)
            return
        what = ", ".join(f"{k}={v!r}" for k, v in (("label", cfg.token), ("serial", cfg.serial),
                                                    ("manufacturer", cfg.manufacturer),
                                                    ("model", cfg.model), ("slot", cfg.slot))
                         if v is not None)
        raise MemberUnavailable(self.name, f"no token with {what}", CKR["CKR_TOKEN_NOT_PRESENT"])

    async def _read_keyset(self, helper: HelperProcess, slot: int) -> frozenset[ObjectIdentity]:
        """The identities of the token's public objects (what a login-less probe sees)."""
        timeout = self.group.config.call_timeout
        rv, session = await helper.call([_OPEN_SESSION, slot, 4, 0], timeout)
        if rv != CKR["CKR_OK"]:
            raise MemberUnavailable(self.name, f"C_OpenSession: {rv_name(rv)}", rv)
        try:
            await helper.call([_FIND_INIT, session, [[CKA_TOKEN, b"\x01"]]], timeout)
            handles: list[int] = []
            while True:
                rv, batch = await helper.call([_FIND, session, 256], timeout)
                if rv != CKR["CKR_OK"] or not batch:
                    break
                handles += batch
            await helper.call([_FIND_FINAL, session], timeout)
            keys = set()
            for h in handles:
                rv, values = await helper.call([_GET_ATTRIBUTE_VALUE, session, h, IDENTITY_TEMPLATE],
                                               timeout)
                if isinstance(values, list) and len(values) == len(IDENTITY_TEMPLATE):
                    keys.add(identity_from_values(values)[1])
            return frozenset(keys)
        finally:
            await close_probe_session(helper, self.name, slot, session, timeout)

    async def start(self) -> None:
        """Probes the member with a first helper, which then joins the warm pool."""
        try:
            helper = await self.new_helper(probing=True)
            try:
                await self.probe(helper)
            except BaseException:
                await helper.stop()
                raise
        except HelperLimit:
            self.mark(MemberState.FAILED, CKR["CKR_HOST_MEMORY"], "max_helpers reached")
            return
        except MemberUnavailable as exc:
            self.mark(MemberState.FAILED, exc.rv, str(exc))
            log.error("member failure detected: group=%s member=%s function=probe rv=%s (%s)",
                      self.group.label, self.name, rv_name(exc.rv), exc)
            return
        self._warm.append(helper)
        self.mark(MemberState.OK)
        self._schedule_refill()
        log.info("member ready: group=%s member=%s slot=%s mechanisms=%d",
                 self.group.label, self.name, self.slot_id, len(self.mechanisms))

    def mark(self, state: MemberState, rv: int | None = None, why: str = "") -> None:
        h = self.health
        audit.installed().member_state(self, h.state, state, rv, why)
        h.state = state
        h.since = time.monotonic()
        if rv is not None:
            h.last_rv = rv
        if why:
            h.last_error = why
        elif state is MemberState.OK:  # back in service: the old error is history (logs)
            h.last_rv, h.last_error = None, ""

    def status(self) -> dict[str, Any]:
        h = self.health
        now = time.monotonic()
        return {
            "name": self.name, "state": h.state.value, "slot": self.slot_id,
            "last_rv": rv_name(h.last_rv) if h.last_rv is not None else None,
            "last_error": h.last_error, "calls_served": h.calls_served,
            "direct_sessions": h.bound, "direct_calls_served": h.direct_served,
            "calls_in_flight": h.calls_in_flight, "attempt": h.attempt,
            "attempts": self.group.config.recovery.attempts,
            "probe": None if h.probe_at is None else {
                "ago": round(now - h.probe_at, 3), "latency_ms": round(h.probe_latency * 1000, 3),
                "ok": not h.probe_error, "error": h.probe_error},
            "held_out": round(max(0.0, h.held_until - now), 3),
        }


class Group:
    """A virtual token: members in priority order behind one virtual slot."""

    def __init__(self, config: GroupConfig, slot_id: int, pool_size: int, max_frame: int) -> None:
        self.config = config
        self.label = config.label
        self.slot_id = slot_id
        self.label_bytes = _pad32(config.label)
        self.members = [Member(m, self, pool_size, max_frame) for m in config.members]
        self.rv_classes: dict[int, RvClass] = class_table(config.rv_classes)
        self._changed = asyncio.Event()
        self.metrics = GroupMetrics()
        # bumped by every call through p11p that may create, change or destroy an
        # object on this group's members: cached find results of an older generation
        # are not used (dispatch.py, find_init)
        self.objects_generation = 0
        # write_policy = "all": token objects destroyed through p11p while a member was
        # out of service, destroyed there too when it returns (sync.py)
        self.destroyed_while_out: dict[Member, set[ObjectIdentity]] = {}
        # token objects written through p11p to one member (write_policy "primary"), by
        # identity: every application's handle of them writes there (placement.py)
        self.homes: dict[ObjectIdentity, Member] = {}
        # such objects destroyed through p11p since (until one of that identity is made
        # again): another application's handle of one is on no member, and answered so at
        # once, not held for a member out of service (placement.py)
        self.destroyed: set[ObjectIdentity] = set()

    def objects_changed(self) -> None:
        self.objects_generation += 1

    def write_protected(self) -> bool:
        """Whether every member's token said CKF_WRITE_PROTECTED when it was found: a
        read/write session is refused at C_OpenSession, as the token would."""
        return bool(self.members) and all(
            m.token_flags & CKF["CKF_WRITE_PROTECTED"] for m in self.members)

    def notify(self) -> None:
        """Wakes calls held while no member was usable."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    def __repr__(self) -> str:
        return f"<Group {self.label} slot={self.slot_id}>"

    def usable_members(self) -> list[Member]:
        return [m for m in self.members if m.health.usable]

    def primary(self) -> Member | None:
        """The first healthy member in priority order."""
        for m in self.members:
            if m.health.state == MemberState.OK:
                return m
        return None

    @property
    def present(self) -> bool:
        return any(m.health.usable for m in self.members)

    async def start(self) -> None:
        await asyncio.gather(*(m.start() for m in self.members))
        self.compare_keysets()

    def compare_keysets(self) -> None:
        """Logs members whose public token objects differ from the first healthy one."""
        ok = [m for m in self.members if m.health.usable]
        for m in ok[1:]:
            if m.keyset != ok[0].keyset:
                only_ref = len(ok[0].keyset - m.keyset)
                only_m = len(m.keyset - ok[0].keyset)
                log.warning("key sets differ: group=%s member=%s lacks %d objects of %s and "
                            "has %d it lacks", self.label, m.name, only_ref, ok[0].name, only_m)

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.members))

    def status(self) -> dict[str, Any]:
        return {"label": self.label, "slot": self.slot_id, "policy": self.config.policy,
                "members": [m.status() for m in self.members]}
