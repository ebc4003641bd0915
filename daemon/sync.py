"""write_policy = "all": a member that returns is brought up to date before it takes
calls (recovery calls `sync` with its new helper).

The token objects of a member in service are compared with the returning member's by
identity (class, CKA_ID, label, key type, CKA_APPLICATION). What the returning member
lacks is made there: keys by wrapping them with `replicate_with` on the member in
service and unwrapping them here (their attributes read there), public keys, data
objects and certificates from their attributes; what was destroyed through p11p while
it was out goes. Private objects are seen only logged in: with a PIN held in memory by
an application logged in to the group, both members are logged in for the comparison
(and out again); with none, only public objects are compared, the log says so, and
the member stays out of service until an application logs in to the group: then the
private ones are compared and it returns.
What cannot be copied (a key that is not extractable) is logged; `p11p keys` shows it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import struct
from typing import TYPE_CHECKING, Any

from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.helperproc import HelperLimit, HelperProcess
from p11p.daemon.members import Group, Member, MemberState
from p11p.daemon.replicate import GENERATION_ONLY, PUBLIC_PARTS, WRAP_MECHANISM
from p11p.daemon.virtual import IDENTITY_TEMPLATE, ObjectIdentity, identity_from_values
from p11p.protocol.constants import CKA, CKO, CKR, CKU, rv_name
from p11p.protocol.spec import by_name

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.ha")
_CODE = {f.name: f.code for f in by_name().values()}
_ULONG = struct.Struct("=Q")
OK = CKR["CKR_OK"]
_FLAGS = [CKA[n] for n in ("CKA_TOKEN", "CKA_PRIVATE", "CKA_SENSITIVE", "CKA_EXTRACTABLE",
                           "CKA_SIGN", "CKA_VERIFY", "CKA_ENCRYPT", "CKA_DECRYPT", "CKA_WRAP",
                           "CKA_UNWRAP", "CKA_DERIVE", "CKA_MODIFIABLE")]
_NAMES = [CKA["CKA_LABEL"], CKA["CKA_ID"]]
# what makes an object of each class besides its flags and names
_BODY = {CKO["CKO_DATA"]: [CKA["CKA_APPLICATION"], CKA["CKA_OBJECT_ID"], CKA["CKA_VALUE"]],
         CKO["CKO_CERTIFICATE"]: [CKA["CKA_CERTIFICATE_TYPE"], CKA["CKA_SUBJECT"],
                                  CKA["CKA_ISSUER"], CKA["CKA_SERIAL_NUMBER"], CKA["CKA_VALUE"]]}


class Side:
    """One member's session for the comparison, on a helper of p11p's own."""

    def __init__(self, member: Member, helper: HelperProcess) -> None:
        self.member, self.helper = member, helper
        self.session = 0
        self.timeout = member.group.config.call_timeout

    async def call(self, name: str, *args: Any) -> list[Any]:
        return await self.helper.call([_CODE[name], *args], self.timeout)

    async def open(self, login: tuple[int, bytes] | None) -> bool:
        reply = await self.call("C_OpenSession", self.member.slot_id, 6, 0)  # RW, serial
        if reply[0] != OK:
            return False
        self.session = reply[1]
        if login is not None:
            reply = await self.call("C_Login", self.session, login[0], login[1])
            return bool(reply[0] in (OK, CKR["CKR_USER_ALREADY_LOGGED_IN"]))
        return True

    async def close(self, logged_in: bool) -> None:
        if self.session and self.helper.alive:
            if logged_in:
                await self.call("C_Logout", self.session)
            await self.call("C_CloseSession", self.session)

    async def objects(self) -> dict[ObjectIdentity, int]:
        reply = await self.call("C_FindObjectsInit", self.session, [[CKA["CKA_TOKEN"], b"\x01"]])
        handles: list[int] = []
        while reply[0] == OK:
            reply = await self.call("C_FindObjects", self.session, 256)
            if reply[0] != OK or not reply[1]:
                break
            handles += reply[1]
        await self.call("C_FindObjectsFinal", self.session)
        out = {}
        for h in handles:
            reply = await self.call("C_GetAttributeValue", self.session, h, IDENTITY_TEMPLATE)
            if isinstance(reply[1], list) and len(reply[1]) == len(IDENTITY_TEMPLATE):
                out[identity_from_values(reply[1])[1]] = h
        return out

    async def attributes(self, handle: int, attrs: list[int]) -> list[list[Any]]:
        """[attr, value] for each of `attrs` the object has (one at a time: a module
        answers the whole call with an error when one attribute does not apply)."""
        out = []
        for a in attrs:
            reply = await self.call("C_GetAttributeValue", self.session, handle, [[a, 8192]])
            if reply[0] == OK and isinstance(reply[1], list) and reply[1][0] is not None:
                out.append([a, reply[1][0]])
        return out


class Sync:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        # members that returned while no application was logged in: their private
        # objects are compared at the next login to the group
        self.pending: set[Member] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def logged_in(self, group: Group) -> None:
        """An application logged in to `group`: members waiting for a login (out of
        service) are compared again, in the background, and return."""
        for member in [m for m in self.pending if m.group is group
                       and m.health.state is MemberState.RECOVERING]:
            self.pending.discard(member)
            task = asyncio.get_running_loop().create_task(self._later(member),
                                                          context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _later(self, member: Member) -> None:
        try:
            helper = await member.helpers.new()
        except (MemberUnavailable, HelperLimit) as exc:
            log.warning("key sets not compared: group=%s member=%s: %s", member.group.label,
                        member.name, exc)
            self.daemon.recovery.start(member)  # it tries again, and waits again
            return
        try:
            complete = await self.sync(member, helper)
        except MemberUnavailable as exc:
            log.warning("key sets not compared: group=%s member=%s: %s", member.group.label,
                        member.name, exc)
            complete = False
        if complete and member.health.state is MemberState.RECOVERING:
            self.daemon.recovery.put_back(member, helper, member.health.attempt)
            return
        await helper.stop()
        if member.health.state is MemberState.RECOVERING:
            self.daemon.recovery.start(member)

    def login(self, member: Member) -> tuple[int, bytes] | None:
        """A PIN an application logged in to the group holds in memory (never logged)."""
        for ctx in self.daemon.contexts.values():
            login = ctx.logins.get(member.group)
            if login is not None and login[0] == CKU["CKU_USER"]:
                return login
        return None

    async def sync(self, member: Member, helper: HelperProcess) -> bool:
        """Brings `member` up to date; False when its private objects could not be
        compared (no login held): it then waits out of service for the next login."""
        group = member.group
        if group.config.write_policy != "all":
            return True
        ref = next((m for m in group.members if m is not member and m.health.usable), None)
        if ref is None:
            return True  # nothing to compare with: it is the token now
        login = self.login(member)
        ref_helper, epoch = await ref.helpers.borrow()
        a, b = Side(ref, ref_helper), Side(member, helper)
        try:
            if not (await a.open(login) and await b.open(login)):
                log.warning("key sets not compared: group=%s member=%s: no session (or login) "
                            "on both members", group.label, member.name)
                return False
            await self.bring_up(group.label, a, b)
            if login is None:
                self.pending.add(member)
                log.warning("member waits for a login: group=%s member=%s: public objects "
                            "compared; private ones are compared, and it returns, when an "
                            "application logs in", group.label, member.name)
                return False
            return True
        finally:
            await a.close(login is not None)
            await b.close(login is not None)
            ref.helpers.give_back(ref_helper, epoch)

    async def bring_up(self, label: str, a: Side, b: Side) -> None:
        have, lack = await a.objects(), await b.objects()
        for identity in group_destroyed(b.member):
            handle = lack.pop(identity, None)
            if handle is not None:
                await b.call("C_DestroyObject", b.session, handle)
        b.member.group.destroyed_while_out.pop(b.member, None)
        b.member.group.written += 1
        copied, failed = 0, []
        for identity, handle in have.items():
            if identity in lack:
                continue
            why = await self.copy(a, b, handle, identity)
            if why:
                failed.append(f"{identity.label!r}: {why}")
            else:
                copied += 1
        if copied or failed:
            log.warning("member brought up to date: group=%s member=%s from %s: %d objects "
                        "copied%s", label, b.member.name, a.member.name, copied,
                        f"; not copied: {'; '.join(failed)}" if failed else "")

    async def copy(self, a: Side, b: Side, handle: int, identity: ObjectIdentity) -> str:
        cls = identity.object_class
        names = await a.attributes(handle, _FLAGS + _NAMES)
        kind = [[CKA["CKA_CLASS"], _ULONG.pack(cls or 0)]]
        if identity.key_type is not None:
            kind.append([CKA["CKA_KEY_TYPE"], _ULONG.pack(identity.key_type)])
        if cls in (CKO["CKO_SECRET_KEY"], CKO["CKO_PRIVATE_KEY"]):
            label = b.member.group.config.replicate_with
            if label is None:
                return "replicate_with is not set"
            keys = []
            for side in (a, b):
                found = await find_key(side, label)
                if len(found) != 1:
                    return f"member {side.member.name} has {len(found)} keys labelled {label!r}"
                keys.append(found[0])
            reply = await a.call("C_WrapKey", a.session, WRAP_MECHANISM, keys[0], handle, 1 << 16)
            if reply[0] != OK:
                return f"wrapping it: {rv_name(reply[0])}"
            template = [t for t in names if t[0] not in GENERATION_ONLY] + kind
            reply = await b.call("C_UnwrapKey", b.session, WRAP_MECHANISM, keys[1], reply[1],
                                 template, 0)
        else:
            body = _BODY.get(cls, []) if cls is not None else []  # CKO_DATA is 0
            if cls == CKO["CKO_PUBLIC_KEY"] and identity.key_type is not None:
                body = PUBLIC_PARTS.get(identity.key_type, [])  # CKK_RSA is 0
            template = names + kind + await a.attributes(handle, body)
            reply = await b.call("C_CreateObject", b.session, template, 0)
        return "" if reply[0] == OK else f"making it: {rv_name(reply[0])}"


async def find_key(side: Side, label: str) -> list[int]:
    reply = await side.call("C_FindObjectsInit", side.session, [
        [CKA["CKA_LABEL"], label.encode()], [CKA["CKA_CLASS"], _ULONG.pack(CKO["CKO_SECRET_KEY"])]])
    if reply[0] != OK:
        return []
    try:
        reply = await side.call("C_FindObjects", side.session, 8)
    finally:
        await side.call("C_FindObjectsFinal", side.session)
    return list(reply[1]) if reply[0] == OK and isinstance(reply[1], list) else []


def group_destroyed(member: Member) -> set[ObjectIdentity]:
    return set(member.group.destroyed_while_out.get(member, set()))
