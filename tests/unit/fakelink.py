"""A fake member link for unit tests of the daemon's call path: the real Router and
Dispatcher over a group whose members' helpers are stand-ins answering the wire form
of a few Cryptoki calls in memory, with PKCS#11's session and login rules (a module
instance per application and member; closing its last session logs the application
out there). Every test runs in milliseconds; nothing here is a PKCS#11 module.

Calls the stand-in knows: C_OpenSession, C_CloseSession, C_CloseAllSessions, C_Login,
C_Logout, C_GetSessionInfo, C_GetTokenInfo, C_FindObjectsInit/FindObjects/Final,
C_GetAttributeValue (the identity attributes), C_GenerateRandom. Objects are token
objects shared by the member's instances, private ones visible only when logged in.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p11p.daemon.audit import Audit
from p11p.daemon.config import GroupConfig, MemberConfig
from p11p.daemon.context import ApplicationContext
from p11p.daemon.dispatch import Dispatcher
from p11p.daemon.handles import HandleCounter
from p11p.daemon.members import Group, Member, MemberState
from p11p.daemon.router import Router
from p11p.daemon.standby import Standby
from p11p.daemon.sync import Sync
from p11p.protocol import spec
from p11p.protocol.constants import CKA, CKO, CKR

CODE = {f.name: f.code for f in spec.functions()}
NAME = {f.code: f.name for f in spec.functions()}
OK = CKR["CKR_OK"]
USER_PIN = b"1234"
CKS_RW_USER_FUNCTIONS, CKS_RW_PUBLIC_SESSION = 3, 2


def ulong(v: int) -> bytes:
    return struct.pack("=Q", v)


@dataclass
class FakeObject:
    label: bytes
    private: bool
    object_class: int = CKO["CKO_DATA"]


@dataclass
class FakeToken:
    """One member's token: its objects, and what its module instances did."""

    objects: dict[int, FakeObject] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)


class FakeHelper:
    """One module instance (an application's helper on one member)."""

    alive, stopping, why, pid = True, False, "", 0

    def __init__(self, token: FakeToken) -> None:
        self.token = token
        self.sessions: dict[int, list[int] | None] = {}  # handle -> pending find results
        self.next = 100
        self.logged_in = False

    def kill(self) -> None:
        self.alive = False

    async def stop(self) -> None:
        self.alive = False

    async def count_direct(self, *_: Any) -> None:
        return None

    async def call(self, request: list[Any], timeout: float) -> list[Any]:
        name = NAME[request[0]]
        self.token.calls.append(name)
        handler = getattr(self, name, None)
        if handler is None:
            return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]
        reply: list[Any] = handler(*request[1:])
        return reply

    def _session(self, h: Any) -> bool:
        return h in self.sessions

    def C_OpenSession(self, slot: int, flags: int, _: Any) -> list[Any]:
        self.next += 1
        self.sessions[self.next] = None
        return [OK, self.next]

    def C_CloseSession(self, h: int) -> list[Any]:
        if not self._session(h):
            return [CKR["CKR_SESSION_HANDLE_INVALID"]]
        del self.sessions[h]
        if not self.sessions:
            self.logged_in = False  # PKCS#11 §5.6: the last session closed
        return [OK]

    def C_CloseAllSessions(self, slot: int) -> list[Any]:
        self.sessions.clear()
        self.logged_in = False
        return [OK]

    def C_Login(self, h: int, user: int, pin: bytes) -> list[Any]:
        if not self._session(h):
            return [CKR["CKR_SESSION_HANDLE_INVALID"]]
        if self.logged_in:
            return [CKR["CKR_USER_ALREADY_LOGGED_IN"]]
        if pin != USER_PIN:
            return [CKR["CKR_PIN_INCORRECT"]]
        self.logged_in = True
        return [OK]

    def C_Logout(self, h: int) -> list[Any]:
        if not self._session(h):
            return [CKR["CKR_SESSION_HANDLE_INVALID"]]
        if not self.logged_in:
            return [CKR["CKR_USER_NOT_LOGGED_IN"]]
        self.logged_in = False
        return [OK]

    def C_GetSessionInfo(self, h: int, _: Any) -> list[Any]:
        if not self._session(h):
            return [CKR["CKR_SESSION_HANDLE_INVALID"], None]
        state = CKS_RW_USER_FUNCTIONS if self.logged_in else CKS_RW_PUBLIC_SESSION
        return [OK, [0, state, 6, 0]]

    def C_GetTokenInfo(self, slot: int, _: Any) -> list[Any]:
        return [OK, [b"fake".ljust(32)] + [0] * 16]

    def C_FindObjectsInit(self, h: int, template: Any) -> list[Any]:
        if not self._session(h):
            return [CKR["CKR_SESSION_HANDLE_INVALID"]]
        want = {a[0]: a[1] for a in template or []}
        found = [oh for oh, o in self.token.objects.items()
                 if (self.logged_in or not o.private)
                 and want.get(CKA["CKA_LABEL"], o.label) == o.label
                 and want.get(CKA["CKA_CLASS"], ulong(o.object_class)) == ulong(o.object_class)]
        self.sessions[h] = found
        return [OK]

    def C_FindObjects(self, h: int, most: int) -> list[Any]:
        found = self.sessions.get(h)
        if found is None:
            return [CKR["CKR_OPERATION_NOT_INITIALIZED"], None]
        batch, self.sessions[h] = found[:most], found[most:]
        return [OK, batch]

    def C_FindObjectsFinal(self, h: int) -> list[Any]:
        if self.sessions.get(h) is None:
            return [CKR["CKR_OPERATION_NOT_INITIALIZED"]]
        self.sessions[h] = None
        return [OK]

    def C_GetAttributeValue(self, h: int, obj: int, template: list[list[int]]) -> list[Any]:
        o = self.token.objects.get(obj)
        if not self._session(h):
            return [CKR["CKR_SESSION_HANDLE_INVALID"], None]
        if o is None or (o.private and not self.logged_in):
            return [CKR["CKR_OBJECT_HANDLE_INVALID"], None]
        known = {CKA["CKA_TOKEN"]: b"\x01", CKA["CKA_CLASS"]: ulong(o.object_class),
                 CKA["CKA_LABEL"]: o.label, CKA["CKA_PRIVATE"]: bytes([o.private])}
        return [OK, [known.get(t) for t, _ in template]]

    def C_GenerateRandom(self, h: int, n: int) -> list[Any]:
        if not self._session(h):
            return [CKR["CKR_SESSION_HANDLE_INVALID"], None]
        return [OK, bytes(n)]


class _Direct:
    async def revoke(self, vs: Any) -> None:
        vs.unbind()

    async def bind(self, *_: Any) -> list[Any]:
        return [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]

    key = object = unbind = adopt = adopt_update = bind

    def member_back(self, member: Any) -> None:
        return None


class _Recovery:
    def start(self, member: Member, at_once: bool = False) -> None:
        return None


@dataclass
class _Limits:
    max_calls_per_app: int = 64
    max_sessions_per_app: int = 1024


class FakeDaemon:
    """What the Router and the Dispatcher use of the daemon, over one group of fake
    members named `names`, all in service."""

    def __init__(self, names: list[str], policy: str = "failover") -> None:
        members = tuple(MemberConfig(n, "fake.so", n, None, {}) for n in names)
        config = GroupConfig("fake", Path("fake.toml"), policy, "primary", members,
                             call_timeout=2.0, hold_timeout=0.2, object_cache_ttl=0.0)
        self.group = Group(config, 7, 0, 1 << 20)
        self.groups = [self.group]
        self.slots = {7: self.group}
        self.tokens: dict[str, FakeToken] = {}
        for i, m in enumerate(self.group.members):
            m.slot_id = i
            m.mark(MemberState.OK)
            self.tokens[m.name] = FakeToken({
                1: FakeObject(b"public", False),
                2: FakeObject(b"private", True, CKO["CKO_PRIVATE_KEY"])})
        self.helpers: dict[tuple[int, str], FakeHelper] = {}
        self.contexts: dict[Any, ApplicationContext] = {}
        self.config = _Limits()
        self.direct = _Direct()
        self.recovery = _Recovery()
        self.audit = Audit()  # the null one (daemon/audit.py)
        self.sync = Sync(self)  # type: ignore[arg-type]  # write_policy "all" only
        self.standby = Standby(self)  # type: ignore[arg-type]
        self.counter = HandleCounter()
        self.router = Router(self)  # type: ignore[arg-type]
        self.dispatcher = Dispatcher(self)  # type: ignore[arg-type]

    def allowed(self, ctx: ApplicationContext, group: Group) -> bool:
        return True

    def slot_event(self, group: Group) -> None:
        return None

    async def end_context(self, ctx: ApplicationContext) -> None:
        self.standby.forget(ctx)
        await ctx.close()

    def context(self, pid: int) -> ApplicationContext:
        """A new application; its helpers are this daemon's fake ones."""
        ctx = ApplicationContext((pid, bytes(16)), 0, 0, pid, "app", self.counter)
        self.contexts[ctx.key] = ctx
        for member in self.group.members:
            helper = self.helpers[(pid, member.name)] = FakeHelper(self.tokens[member.name])
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(helper)
            ctx._helpers[member] = fut  # the start itself is context.py's own test
        return ctx

    async def call(self, ctx: ApplicationContext, name: str, *args: Any) -> list[Any]:
        """One application call, through the Dispatcher as a frame's would go."""
        return await self.dispatcher.dispatch(ctx, [CODE[name], *args])
