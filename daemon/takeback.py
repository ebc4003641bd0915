"""A restarted daemon takes back what the daemon before it left (daemon/resume.py writes
it): at its start, each application context's state file with the helpers it names,
and groups.state; later, at a hello, a context whose helpers had all died.

A file whose helpers are taken back is opened with the key they kept (KEPT), and its
logins come from them. The client library keeps the key and its logins too (link
feature `resume`): the hello's answer gives it the key, it follows its own logins
(client/kept.c: locked memory, wiped at C_Logout and C_Finalize), and every hello it
makes after that carries both. A daemon that took no helper of a file back (all had
died: the application's members failed since its last call, and the daemon was killed,
not stopped) keeps the file pending for as long as it waits for the application, and
opens it with the key of the hello that comes with the file's context id from the
file's process; what stood on the dead helpers is rebuilt where it is used next, logged
in with the logins the hello brought. A login no helper and no hello brings counts as
ended (the application logs in again).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from p11p.daemon import hello
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.helperproc import AdoptedHelper, HelperProcess
from p11p.daemon.members import Group, Member
from p11p.daemon.resume import ADOPT_TIMEOUT, VERSION, Resume, _member, _Reader, _unlink
from p11p.daemon.virtual import ObjectIdentity

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.resume")


class _Pending:
    """A file no helper could open: its application's hello brings the key."""

    def __init__(self, path: Path, head: dict[str, Any], head_bytes: bytes, sealed: bytes,
                 timer: asyncio.TimerHandle) -> None:
        self.path, self.head, self.head_bytes, self.sealed = path, head, head_bytes, sealed
        self.timer = timer



class TakeBack:
    """What a restarted daemon takes back from `resume`'s directory."""

    def __init__(self, daemon: Daemon, resume: Resume) -> None:
        self.daemon, self.resume = daemon, resume
        self.pending: dict[tuple[int, bytes], _Pending] = {}

    def _restore_groups(self) -> None:
        path = self.resume.dir / "groups.state"
        try:
            data = msgpack.unpackb(path.read_bytes())
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError("another version")
            for group in self.daemon.groups:
                saved = data["groups"].get(group.label)
                if saved is None:
                    continue
                members = {m.name: m for m in group.members}
                for *identity, name in saved["homes"]:
                    if name in members:
                        group.homes[ObjectIdentity(*identity)] = members[name]
                group.destroyed.update(ObjectIdentity(*i) for i in saved["destroyed"])
                for name, ids in saved["while_out"].items():
                    if name in members:
                        group.destroyed_while_out.setdefault(members[name], set()).update(
                            ObjectIdentity(*i) for i in ids)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            log.warning("restart: groups.state not taken (%r): writes to token objects "
                        "on one member may be refused while a member is out", exc)

    async def restore(self) -> None:
        """Takes back the contexts of the daemon before (their files); each one waits
        for its application as one whose connections closed (context_grace, at least
        adopt_timeout)."""
        if not self.resume.enabled or not self.resume.dir.is_dir():
            return
        self._restore_groups()
        for stale in self.resume.dir.glob("*.tmp"):  # a write the daemon before left
            _unlink(stale)
        files = sorted(p for p in self.resume.dir.glob("*.state") if p.name != "groups.state")
        restored = await asyncio.gather(*(self._restore(f) for f in files))
        if files:
            log.info("restart: %d of %d application contexts taken back",
                     sum(restored), len(files))

    async def _restore(self, path: Path) -> bool:
        daemon = self.daemon
        helpers: dict[tuple[str, int], AdoptedHelper] = {}
        members: dict[tuple[str, int], Member] = {}
        try:
            data = path.read_bytes()
            size = int.from_bytes(data[:4], "big")
            head_bytes, rest = data[4:4 + size], data[4 + size:]
            head = pickle.loads(head_bytes)  # noqa: S301 - our own file, 0600 in a 0700 dir
            if not isinstance(head, dict) or head.get("version") != VERSION:
                raise ValueError("a state file of another version")
            ctx = ApplicationContext(head["key"], head["uid"], head["gid"], head["pid"],
                                     head["prog"], daemon.counter)
            for label, name, (member_name, pid, adopt, fast, fast_name) in head["helpers"]:
                try:
                    member = _member(daemon, label, name)
                except pickle.UnpicklingError:
                    continue  # a member no longer configured: its helper ends alone
                helpers[(member_name, pid)] = AdoptedHelper(
                    member_name, daemon.config.max_frame, pid, adopt, fast, fast_name)
                members[(member_name, pid)] = member
        except Exception as exc:  # noqa: BLE001 - an unreadable file: its application starts afresh
            log.warning("restart: state file %s not taken (%r); its application's "
                        "sessions end", path.name, exc)
            _unlink(path)
            return False
        outcomes = await asyncio.gather(*(h.attach(ADOPT_TIMEOUT) for h in helpers.values()),
                                        return_exceptions=True)
        taken: dict[Member, HelperProcess] = {}
        for key, outcome in zip(helpers, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                log.warning("restart: %s member=%s helper pid=%d not taken back: %s",
                            ctx.name, key[0], key[1], outcome)
            else:
                helpers[key].on_death = members[key].helper_died
                taken[members[key]] = helpers[key]
        if not taken and _pid_alive(ctx.pid) and ctx.key not in daemon.contexts:
            # no helper lives to give the key: the application's hello may bring it
            wait = max(daemon.config.context_grace, daemon.config.adopt_timeout)
            timer = asyncio.get_running_loop().call_later(wait, self._expire, ctx.key)
            self.pending[ctx.key] = _Pending(path, head, head_bytes, rest, timer)
            log.info("restart: %s waits for its application to bring its key (no helper "
                     "of it lives)", ctx.name)
            return False
        _unlink(path)
        state_key, kept = await self._kept(taken)
        state = (self._open(ctx, state_key, rest, head_bytes, helpers,
                            head.get("clean") is True) if state_key is not None else None)
        if state is None or not _pid_alive(ctx.pid) or ctx.key in daemon.contexts:
            log.info("restart: %s not taken back (%s); its helpers end", ctx.name,
                     "its application is gone" if state is not None
                     else "no helper kept its key")
            await asyncio.gather(*(h.stop() for h in taken.values()), return_exceptions=True)
            return False
        self._take(ctx, state, taken, kept)
        ctx.waiting = True
        daemon.contexts[ctx.key] = ctx
        self.resume.save(ctx)  # as taken back: a kill before its next call finds it again
        wait = max(daemon.config.context_grace, daemon.config.adopt_timeout)
        ctx.grace = asyncio.get_running_loop().call_later(wait, daemon.expire_context, ctx)
        log.info("restart: %s taken back (%d sessions, %d objects, %d helpers)", ctx.name,
                 len(ctx.sessions), len(ctx.objects), len(taken))
        return True

    async def _kept(self, taken: dict[Member, HelperProcess]
                    ) -> tuple[bytes | None, list[tuple[Group, int, bytes]]]:
        """The key and the logins the helpers taken back kept."""
        logins: list[tuple[Group, int, bytes]] = []
        key = None
        for member, helper in taken.items():
            try:
                kept, login = await helper.kept(ADOPT_TIMEOUT)
            except MemberUnavailable:
                continue
            key = key or kept
            if login is not None:
                logins.append((member.group, *login))
        return key, logins

    def _open(self, ctx: ApplicationContext, key: bytes, sealed: bytes, head: bytes,
              helpers: dict[tuple[str, int], AdoptedHelper], clean: bool
              ) -> dict[str, Any] | None:
        """The file's contents, opened with `key` into `ctx` (None: not readable). Not
        `clean` (the daemon was killed, not stopped): an operation the file says runs may
        have ended within the lazy write's window before the kill (resume.py MOVES), so
        none is replayed: should its member fail, it is lost (its next call gets
        CKR_DEVICE_ERROR, a new init starts afresh) rather than replayed where it may
        have ended, and block every init of its session there."""
        try:
            body = AESGCM(key).decrypt(sealed[:12], sealed[12:], head)
            ctx.state_key = key
            state: dict[str, Any] = _Reader(body, self.daemon, ctx, helpers).load()
        except (InvalidTag, pickle.UnpicklingError, ValueError, EOFError) as exc:
            log.warning("restart: %s state not readable: %r", ctx.name, exc)
            return None
        self.daemon.counter.resume_at(state["counter"])
        ctx.sessions.restore(state["sessions"])
        for vs in ctx.sessions.values():  # a bound session counts in its member's load
            if vs.direct is not None:
                vs.direct.member.health.bound += 1
            for op in vs.ops.values() if not clean else ():
                if op.replayable:
                    op.replayable, op.updates = False, []
                    op.why = "it may have ended before the daemon was killed"
        ctx.objects.restore(state["objects"])
        ctx.by_real = state["by_real"]
        ctx.token_index = state["token_index"]
        ctx.logged_in = state["logged_in"]
        ctx.utility = state["utility"]
        return state

    def _take(self, ctx: ApplicationContext, state: dict[str, Any],
              taken: dict[Member, HelperProcess], kept: list[tuple[Group, int, bytes]]) -> None:
        """`ctx` as its file says, on the helpers `taken`, logged in with `kept` logins."""
        ctx.adopt_helpers(taken)
        # what stood on a helper not taken back (or dead before the stop) is gone, as
        # when a helper dies: rebuilt where it is used next
        for member in {m for g in {vs.group for vs in ctx.sessions.values()}
                       | set(state["logins"]) for m in g.members} - set(taken):
            ctx.forget_member(member)
        for vs in ctx.sessions.values():
            if vs.direct is not None and vs.direct.helper not in taken.values():
                vs.unbind()
            if vs.left is not None and vs.left.helper not in taken.values():
                vs.left = None
        for group, user_type in state["logins"].items():
            pin = next((p for g, t, p in kept if g is group and t == user_type), None)
            if pin is not None:
                ctx.logins[group] = (user_type, pin)
                continue
            ctx.lost_logins[group] = user_type
            for member in group.members:
                ctx.logged_in.discard(member)

    def claim(self, pid: int, uid: int, ctx_id: bytes, resume: hello.Resumption | None
              ) -> ApplicationContext | None:
        """The context of a hello, from a pending file (see the module's docstring), or
        None: it starts afresh."""
        for stale in [k for k in self.pending if k[0] == pid and k[1] != ctx_id]:
            # its library initialized again (one instance per process): never comes back
            self._expire(stale)
        pending = self.pending.pop((pid, ctx_id), None)
        if pending is None:
            return None
        pending.timer.cancel()
        head = pending.head
        ctx = ApplicationContext(head["key"], head["uid"], head["gid"], head["pid"],
                                 head["prog"], self.daemon.counter)
        state = None
        if resume is not None and uid == head["uid"]:
            state = self._open(ctx, resume.key, pending.sealed, pending.head_bytes, {},
                               head.get("clean") is True)
        if state is None:
            log.info("restart: %s starts afresh (%s)", ctx.name,
                     "its hello brought no key" if resume is None else "not readable")
            _unlink(pending.path)
            return None
        self._take(ctx, state, {}, [])
        self.relogin(ctx, resume)
        self.resume.save(ctx)
        log.info("restart: %s taken back with the key its library kept (%d sessions, "
                 "%d objects)", ctx.name, len(ctx.sessions), len(ctx.objects))
        return ctx

    def relogin(self, ctx: ApplicationContext, resume: hello.Resumption | None) -> None:
        """The logins a hello brings, for the groups whose login no helper kept."""
        if resume is None or not ctx.lost_logins:
            return
        for group, user_type in list(ctx.lost_logins.items()):
            pin = next((p for slot, t, p in resume.logins
                        if slot == group.slot_id and t == user_type), None)
            if pin is None:
                continue
            del ctx.lost_logins[group]
            if group not in ctx.logins and any(vs.group is group
                                               for vs in ctx.sessions.values()):
                ctx.logins[group] = (user_type, pin)
                self.daemon.standby.logged_in(ctx, group)
                log.info("restart: %s group=%s logged in again with its library's login",
                         ctx.name, group.label)

    def _expire(self, key: tuple[int, bytes]) -> None:
        pending = self.pending.pop(key, None)
        if pending is not None:
            pending.timer.cancel()
            log.info("restart: state file %s not claimed by its application; dropped",
                     pending.path.name)
            _unlink(pending.path)


def _pid_alive(pid: int) -> bool:
    from p11p.daemon.service import _pid_alive as alive
    return alive(pid)
