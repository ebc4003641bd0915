"""Health probes: members are checked on their own, not only when an application call
meets them.

Every `[health] interval` seconds each member in service (standby ones included) is
probed on one of its warm helpers (module initialised, not logged in; not an
application's): `probe = "token-info"` asks C_GetTokenInfo of its slot and opens and
closes a session; `probe = "sign"` also signs 32 random bytes with the key labelled
`probe_key` and verifies the signature (with the public key of the same label, or with
the same secret key). The key must be usable without login (CKA_PRIVATE false). A failed
probe fails the member as a failed call does; recovery runs the same probe before the
member returns. A member that fails again within `[recovery] max_interval` of its return
is held out twice as long as the last time (from `[recovery] interval`), up to
`max_interval`: a member that fails only some calls does not come and go every second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from typing import TYPE_CHECKING, Any

from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.helperproc import HelperLimit, HelperProcess
from p11p.daemon.members import Group, Member, MemberState, close_probe_session
from p11p.protocol.constants import CKA, CKK, CKM, CKO, CKR, rv_name
from p11p.protocol.spec import by_name

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.health")

_CODE = {f.name: f.code for f in by_name().values()}
_ULONG = struct.Struct("=Q")
OK = CKR["CKR_OK"]
# the mechanism a probe signs with, by key type (data: 32 bytes)
_SIGN_MECHANISMS = {CKK["CKK_EC"]: CKM["CKM_ECDSA"], CKK["CKK_RSA"]: CKM["CKM_SHA256_RSA_PKCS"],
                    CKK["CKK_GENERIC_SECRET"]: CKM["CKM_SHA256_HMAC"],
                    CKK["CKK_AES"]: CKM["CKM_AES_CMAC"]}


def _ulong(value: int) -> bytes:
    return _ULONG.pack(value)


class ProbeFailed(MemberUnavailable):
    """A health probe that did not pass (a member-failed condition)."""


async def probe(member: Member, helper: HelperProcess) -> float:
    """Runs the group's probe on `helper`; returns its latency (seconds) or raises
    MemberUnavailable (ProbeFailed when the member answered wrongly)."""
    cfg = member.group.config
    timeout = cfg.call_timeout
    slot = member.slot_id
    if slot is None:
        raise ProbeFailed(member.name, "health probe: the member's slot is not known")
    start = time.monotonic()

    async def call(name: str, *args: Any) -> list[Any]:
        reply = await helper.call([_CODE[name], *args], timeout)
        if reply[0] != OK:
            raise ProbeFailed(member.name, f"health probe: {name} returned {rv_name(reply[0])}",
                              reply[0], function=name)
        return reply

    await call("C_GetTokenInfo", slot, 0)
    session = (await call("C_OpenSession", slot, 4, 0))[1]  # CKF_SERIAL_SESSION
    try:
        if cfg.health.probe == "sign":
            assert cfg.health.probe_key is not None
            await _sign_and_verify(call, session, cfg.health.probe_key.encode(), member.name)
    finally:
        if helper.alive:
            await close_probe_session(helper, member.name, slot, session, timeout)
    return time.monotonic() - start


async def _find(call: Any, session: int, label: bytes, classes: tuple[int, ...]) -> int | None:
    for cls in classes:
        await call("C_FindObjectsInit", session, [[CKA["CKA_LABEL"], label],
                                                  [CKA["CKA_CLASS"], _ulong(cls)]])
        try:
            found = (await call("C_FindObjects", session, 2))[1]
        finally:
            await call("C_FindObjectsFinal", session)
        if found:
            return int(found[0])
    return None


async def _sign_and_verify(call: Any, session: int, label: bytes, name: str) -> None:
    key = await _find(call, session, label, (CKO["CKO_PRIVATE_KEY"], CKO["CKO_SECRET_KEY"]))
    if key is None:
        raise ProbeFailed(name, f"health probe: no key labelled {label.decode(errors='replace')!r} "
                          "usable without login (probe_key; CKA_PRIVATE must be false)",
                          CKR["CKR_KEY_HANDLE_INVALID"])
    values = (await call("C_GetAttributeValue", session, key,
                         [[CKA["CKA_KEY_TYPE"], 8], [CKA["CKA_CLASS"], 8]]))[1]
    key_type, cls = (_ULONG.unpack(v)[0] if isinstance(v, bytes) and len(v) == 8 else None
                     for v in values)
    mech = _SIGN_MECHANISMS.get(key_type) if key_type is not None else None
    if mech is None:
        raise ProbeFailed(name, f"health probe: probe_key has key type {key_type}, which the "
                          "probe does not sign with (EC, RSA, AES, generic secret)",
                          CKR["CKR_KEY_TYPE_INCONSISTENT"])
    verifier = key
    if cls == CKO["CKO_PRIVATE_KEY"]:
        public = await _find(call, session, label, (CKO["CKO_PUBLIC_KEY"],))
        if public is None:
            raise ProbeFailed(name, "health probe: no public key with probe_key's label to "
                              "verify with", CKR["CKR_KEY_HANDLE_INVALID"])
        verifier = public
    data = os.urandom(32)
    await call("C_SignInit", session, [mech, None], key)
    signature = (await call("C_Sign", session, data, 1024))[1]
    await call("C_VerifyInit", session, [mech, None], verifier)
    await call("C_Verify", session, data, signature)  # CKR_SIGNATURE_INVALID fails it


class HealthMonitor:
    """One task per group with probes on: each member in service probed every
    interval, all of the group's members at once."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for group in self.daemon.groups:
            if group.config.health.interval > 0:
                self.tasks.append(asyncio.create_task(self._run(group)))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    async def _run(self, group: Group) -> None:
        interval = group.config.health.interval
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self.check(m) for m in group.members
                                   if m.health.state in (MemberState.OK, MemberState.DRAINING)))

    async def check(self, member: Member) -> None:
        """One probe of a member in service; a failure fails the member."""
        try:
            helper, epoch = await member.helpers.borrow()
        except HelperLimit:
            return  # no helper to spare now: the next round
        except MemberUnavailable as exc:
            self.failed(member, exc)
            return
        try:
            latency = await probe(member, helper)
        except MemberUnavailable as exc:
            helper.kill()
            self.failed(member, exc)
            return
        except BaseException:
            helper.kill()
            raise
        member.helpers.give_back(helper, epoch)
        h = member.health
        h.probe_at, h.probe_latency, h.probe_error = time.monotonic(), latency, ""

    def failed(self, member: Member, exc: MemberUnavailable) -> None:
        h = member.health
        h.probe_at, h.probe_latency, h.probe_error = time.monotonic(), 0.0, str(exc)
        if member.health.state not in (MemberState.OK, MemberState.DRAINING):
            return  # failed (or drained away) meanwhile
        self.daemon.router.failures.member_failed(member, exc, "health probe")


def takes_work_elsewhere(member: Member) -> bool:
    """Whether another member of the group takes new work (in service, not draining)."""
    return any(m is not member and m.placeable for m in member.group.members)


def hold_out(member: Member) -> None:
    """A member failed: when it had returned within `max_interval` and another member
    takes new work, it is held out twice as long as last time; otherwise for `interval`
    (recovery's first attempt)."""
    h = member.health
    rec = member.group.config.recovery
    now = time.monotonic()
    # a group with no other member taking new work (in service, not draining) takes its
    # member back as soon as it answers: holding it out would hold the whole token out
    others = takes_work_elsewhere(member)
    flapping = others and h.returned_at is not None and now - h.returned_at < rec.max_interval
    h.holdout = min(max(2 * h.holdout, 2 * rec.interval), rec.max_interval) if flapping \
        else rec.interval
    h.held_until = now + h.holdout
    if flapping:
        log.warning("member held out: group=%s member=%s for %.1f s: it failed %.1f s after "
                    "it returned", member.group.label, member.name, h.holdout,
                    now - (h.returned_at or now))
