"""Groups and their members: the real tokens behind each virtual token.

A Member knows its module, how to find its token (label or serial), its real slot id,
its health, and its helpers (pool.py: the warm pool and the recycling of an ended
application's helpers). A Group is what the application sees as one token; it owns
its members in priority order and its virtual slot id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from p11p.daemon import audit
from p11p.daemon.config import GroupConfig, MemberConfig
from p11p.daemon.errors import MemberUnavailable, RvClass, class_table
from p11p.daemon.helperproc import HelperLimit, HelperProcess
from p11p.daemon.metrics import GroupMetrics, MemberMetrics
from p11p.daemon.pool import HelperPool
from p11p.daemon.virtual import CKA_TOKEN, IDENTITY_TEMPLATE, ObjectIdentity, identity_from_values
from p11p.protocol.constants import CKR, rv_name
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
        self.keyset: frozenset[ObjectIdentity] = frozenset()
        self.health = MemberHealth()
        self.helpers = HelperPool(self, pool_size, max_frame)
        self.on_helper_death: Callable[[Member, str], None] | None = None
        self.metrics = MemberMetrics()
        # C_GetMechanismList/Info answers (CKR_OK) by request: a token's mechanisms do
        # not change while it serves; forgotten when the member recovers (it may come
        # back as another device)
        self.mechanism_answers: dict[tuple[Any, ...], list[Any]] = {}

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

    def helper_died(self, why: str) -> None:
        """A helper exited by itself (crash, kill): the member is failed (DESIGN)."""
        if self.on_helper_death is not None:
            self.on_helper_death(self, why)

    async def stop(self) -> None:
        await self.helpers.stop()

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
            helper = await self.helpers.new(probing=True)
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
        self.mark(MemberState.OK)
        self.helpers.start_with(helper)
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
        # bumped by each change of the three above: a restarted daemon finds them in the
        # state directory (daemon/resume.py, groups.state)
        self.written = 0
        # sessions the client library opened itself and the daemon opened at their first
        # call (OPEN_AT; p11p status)
        self.client_opens = 0

    def objects_changed(self) -> None:
        self.objects_generation += 1

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
                "client_opens": self.client_opens,
                "members": [m.status() for m in self.members]}
