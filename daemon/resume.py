"""Daemon restarts that applications do not notice (DESIGN, invariant 6).

An application's helpers outlive the daemon (helper/loop.py, ADOPTABLE): their module
instances keep the member sessions, the login, the session objects and the operations,
and keep serving the data plane. What the daemon knows of each application context
(virtual sessions and objects, what stands behind them, which helper holds what) is
written to a state file in the runtime directory before each reply that may have changed
it, and at a stop. A daemon that starts reads the files, takes the helpers back over
their adoption sockets and waits for the applications' client libraries, which reconnect
with their context id and find their handles where they left them.

What a state file never holds: a PIN (the helper that took the login keeps it, in locked
memory, and gives it to the next daemon: KEPT_LOGIN), key values (a session object made
with C_CreateObject is kept where it is, but cannot be remade on another member after a
restart) and an operation's data (operations go on in their member sessions; one that a
failover after the restart meets is lost, as one past `replay_limit`). Files are 0600 in
a 0700 directory, written whole and renamed; a file this build cannot read is set aside
and its application starts afresh (logged).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.handles import HandleCounter
from p11p.daemon.helperproc import AdoptedHelper, HelperProcess
from p11p.daemon.members import Group, Member
from p11p.daemon.policy import Operation
from p11p.daemon.shapes import CODE
from p11p.daemon.virtual import Recipe

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.resume")

VERSION = 1
ADOPT_TIMEOUT = 3.0  # seconds to take one helper back
# calls that change nothing the state file holds
READ_ONLY = frozenset(CODE[n] for n in (
    "C_GetInfo", "C_GetSlotList", "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList",
    "C_GetMechanismInfo", "C_GetSessionInfo", "C_GetAttributeValue", "C_GetObjectSize",
    "C_GenerateRandom", "C_SeedRandom", "C_WaitForSlotEvent"))
_CREATE = CODE["C_CreateObject"]
_KEPT_OUT = "the daemon restarted: its data was not kept"


def _stripped_operation(init: list[Any], keys: dict[int, Any]) -> Operation:
    return Operation(init, [], keys, 0, False, _KEPT_OUT)


def _stripped_recipe(outputs: list[Any], generated: bool, sources: dict[int, Any],
                     used: bool) -> Recipe:
    recipe = Recipe([], outputs, generated, sources)
    recipe.used = used
    return recipe


class _Writer(pickle.Pickler):
    """Members, groups, helpers and the context by reference; no operation data, no key
    values."""

    def __init__(self, file: io.BytesIO, ctx: ApplicationContext) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.ctx = ctx

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Member):
            return ("member", obj.group.label, obj.name)
        if isinstance(obj, Group):
            return ("group", obj.label)
        if isinstance(obj, HelperProcess):
            return ("helper", obj.member, obj.pid, obj.adopt, obj.fast, obj.fast_name)
        if isinstance(obj, HandleCounter):
            return ("counter",)
        if obj is self.ctx:
            return ("ctx",)
        if isinstance(obj, ApplicationContext | asyncio.Future | asyncio.Handle):
            raise pickle.PicklingError(f"not for the state file: {obj!r}")
        return None

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is Operation and obj.updates:
            return _stripped_operation, (obj.init, obj.keys)
        if type(obj) is Recipe and obj.request and obj.request[0] == _CREATE:
            return _stripped_recipe, (obj.outputs, obj.generated, obj.sources, obj.used)
        return NotImplemented


class _Reader(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, daemon: Daemon, ctx: ApplicationContext | None) -> None:
        super().__init__(file)
        self.daemon = daemon
        self.ctx = ctx
        self.helpers: dict[tuple[str, int], AdoptedHelper] = {}

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0]
        if kind == "member":
            group = self._group(pid[1])
            for member in group.members:
                if member.name == pid[2]:
                    return member
            raise pickle.UnpicklingError(f"member {pid[2]!r} of {pid[1]!r} is gone")
        if kind == "group":
            return self._group(pid[1])
        if kind == "helper":
            key = (pid[1], pid[2])
            helper = self.helpers.get(key)
            if helper is None:
                helper = self.helpers[key] = AdoptedHelper(
                    pid[1], self.daemon.config.max_frame, pid[2], pid[3], pid[4], pid[5])
            return helper
        if kind == "counter":
            return self.daemon.counter
        if kind == "ctx" and self.ctx is not None:
            return self.ctx
        raise pickle.UnpicklingError(f"unknown reference {kind!r}")

    def _group(self, label: str) -> Group:
        for group in self.daemon.groups:
            if group.label == label:
                return group
        raise pickle.UnpicklingError(f"group {label!r} is gone")


class Resume:
    """The state files of one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.dir: Path = daemon.config.socket.parent / "state"
        self.enabled = daemon.config.adopt_timeout > 0
        self.writes = 0
        self.write_seconds = 0.0

    def _path(self, ctx: ApplicationContext) -> Path:
        return self.dir / f"{ctx.pid}-{ctx.key[1].hex()}.state"

    # -- writing ----------------------------------------------------------------------

    def changed(self, ctx: ApplicationContext, request: Any) -> None:
        """After a call of `ctx`, before its reply: the state file follows."""
        if self.enabled and not ctx.closed and not (
                request and type(request[0]) is int and request[0] in READ_ONLY):
            self.save(ctx)

    def save(self, ctx: ApplicationContext) -> None:
        began = time.perf_counter()
        buf = io.BytesIO()
        head = {"version": VERSION, "key": ctx.key, "uid": ctx.uid, "gid": ctx.gid,
                "pid": ctx.pid, "prog": ctx.prog}
        state = {
            "sessions": ctx.sessions.items(), "objects": ctx.objects.items(),
            "by_real": ctx.by_real, "token_index": ctx.token_index,
            # the user type only: the PIN stays with the helper that logged in
            "logins": {g: login[0] for g, login in ctx.logins.items()},
            "logged_in": ctx.logged_in, "utility": ctx.utility,
            "helpers": {m: h for m, h in ctx.live_helpers() if h.adopt is not None},
        }
        try:
            writer = _Writer(buf, ctx)
            writer.dump(head)
            writer.dump(state)
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self._path(ctx)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, buf.getbuffer())
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
            log.warning("%s state file not written: %s", ctx.name, exc)
        self.writes += 1
        self.write_seconds += time.perf_counter() - began

    def save_all(self) -> None:
        for ctx in list(self.daemon.contexts.values()):
            if not ctx.closed:
                self.save(ctx)

    def forget(self, ctx: ApplicationContext) -> None:
        """The context ended: its file goes."""
        try:
            self._path(ctx).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s state file not removed: %s", ctx.name, exc)

    # -- reading ----------------------------------------------------------------------

    async def restore(self) -> None:
        """Takes back the contexts of the daemon before (their files); each one waits
        for its application as one whose connections closed (context_grace, at least
        adopt_timeout)."""
        if not self.enabled or not self.dir.is_dir():
            return
        files = sorted(self.dir.glob("*.state"))
        restored = await asyncio.gather(*(self._restore(f) for f in files))
        if files:
            log.info("restart: %d of %d application contexts taken back",
                     sum(restored), len(files))

    async def _restore(self, path: Path) -> bool:
        daemon = self.daemon
        try:
            data = path.read_bytes()
            path.unlink()
            state, ctx, reader = self._load(data)
        except Exception as exc:  # noqa: BLE001 - an unreadable file: its application starts afresh
            log.warning("restart: state file %s not taken (%r); its application's "
                        "sessions end", path.name, exc)
            return False
        helpers = list(reader.helpers.values())
        outcomes = await asyncio.gather(*(h.attach(ADOPT_TIMEOUT) for h in helpers),
                                        return_exceptions=True)
        if not _pid_alive(ctx.pid) or ctx.key in daemon.contexts:
            log.info("restart: %s is gone; its helpers end", ctx.name)
            await asyncio.gather(*(h.stop() for h in helpers), return_exceptions=True)
            return False
        # helpers: taken back, or what they held is gone (as when a helper dies)
        members = {(h.member, h.pid): m for m, h in state["helpers"].items()}
        taken: dict[Member, HelperProcess] = {}
        for helper, outcome in zip(helpers, outcomes, strict=True):
            member = members.get((helper.member, helper.pid))
            if isinstance(outcome, BaseException) or member is None:
                log.warning("restart: %s member=%s helper pid=%d not taken back: %s",
                            ctx.name, helper.member, helper.pid, outcome)
                if member is None:
                    await helper.stop()
                continue
            helper.on_death = member.helper_died
            taken[member] = helper
        ctx.adopt_helpers(taken)
        for member in set(state["helpers"]) - set(taken):
            ctx.forget_member(member)
        for vs in ctx.sessions.values():  # a binding left on a helper not taken back
            if vs.left is not None and vs.left.member not in taken:
                vs.left = None
        # the PINs, from the helpers that logged in
        for group, user_type in state["logins"].items():
            pin = await self._kept_pin(ctx, group, user_type, taken)
            if pin is None:
                log.warning("restart: %s group=%s: no helper kept the login; it is "
                            "counted as ended", ctx.name, group.label)
                for member in group.members:
                    ctx.logged_in.discard(member)
                continue
            ctx.logins[group] = (user_type, pin)
        daemon.contexts[ctx.key] = ctx
        self.save(ctx)  # as taken back: a kill before its next call finds it again
        wait = max(daemon.config.context_grace, daemon.config.adopt_timeout)
        ctx.grace = asyncio.get_running_loop().call_later(wait, daemon.expire_context, ctx)
        log.info("restart: %s taken back (%d sessions, %d objects, %d helpers)", ctx.name,
                 len(ctx.sessions), len(ctx.objects), len(taken))
        return True

    def _load(self, data: bytes) -> tuple[dict[str, Any], ApplicationContext, _Reader]:
        """A file is two pickles: the context's identity, then what it holds."""
        reader = _Reader(io.BytesIO(data), self.daemon, None)
        head = reader.load()
        if not isinstance(head, dict) or head.get("version") != VERSION:
            raise ValueError(f"state file version {head.get('version') if isinstance(head, dict) else head!r}")
        ctx = ApplicationContext(head["key"], head["uid"], head["gid"], head["pid"],
                                 head["prog"], self.daemon.counter)
        reader.ctx = ctx
        state = reader.load()
        ctx.sessions.restore(state["sessions"])
        ctx.objects.restore(state["objects"])
        ctx.by_real = state["by_real"]
        ctx.token_index = state["token_index"]
        ctx.logged_in = state["logged_in"]
        ctx.utility = state["utility"]
        return state, ctx, reader

    async def _kept_pin(self, ctx: ApplicationContext, group: Group, user_type: int,
                        taken: dict[Member, HelperProcess]) -> bytes | None:
        for member, helper in taken.items():
            if member.group is not group or member not in ctx.logged_in:
                continue
            try:
                kept = await helper.kept_login(ADOPT_TIMEOUT)
            except MemberUnavailable:
                continue
            if kept is not None and kept[0] == user_type:
                return kept[1]
        return None


def _pid_alive(pid: int) -> bool:
    from p11p.daemon.service import _pid_alive as alive
    return alive(pid)
