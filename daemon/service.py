"""The daemon: groups, application contexts, the listening socket; start and stop.

This is the one object that owns everything else. It probes the members at start,
accepts connections, creates and ends application contexts (by the peer's pid and the
context id of its hello), and answers who may see which group.
"""

from __future__ import annotations

import asyncio
import dataclasses
import grp
import logging
import os
import pwd
import signal
import socket
from typing import Any

from p11p.daemon import audit, forkserver, hello, reconfig
from p11p.daemon.admin import AdminServer
from p11p.daemon.config import ConfigError, DaemonConfig, load
from p11p.daemon.context import ApplicationContext
from p11p.daemon.direct import Direct
from p11p.daemon.dispatch import Dispatcher
from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.handles import HandleCounter
from p11p.daemon.health import HealthMonitor
from p11p.daemon.helperproc import HelperProcess
from p11p.daemon.members import Group, Member, MemberState
from p11p.daemon.recovery import Recovery
from p11p.daemon.resume import ADOPT_TIMEOUT, Resume
from p11p.daemon.router import Router
from p11p.daemon.server import ClientConnection
from p11p.daemon.standby import Standby
from p11p.daemon.sync import Sync
from p11p.daemon.takeback import TakeBack

log = logging.getLogger("p11p.daemon")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not reaped yet) is gone for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.audit = audit.Audit.create(config)  # first: a log it cannot open stops the start
        audit.install(self.audit)
        self.groups = [Group(g, slot, config.helper_pool, config.max_frame)
                       for slot, g in enumerate(config.groups)]
        self.slots = {g.slot_id: g for g in self.groups}
        self.contexts: dict[tuple[int, bytes], ApplicationContext] = {}
        self.counter = HandleCounter()
        self.router = Router(self)
        self.direct = Direct(self.router)
        self.recovery = Recovery(self)
        self.health = HealthMonitor(self)
        self.sync = Sync(self)
        self.standby = Standby(self)
        self.dispatcher = Dispatcher(self)
        self.admin = AdminServer(self)
        self._server: asyncio.AbstractServer | None = None
        # the listening socket's path is ours to remove only when we bound it: an
        # inherited one (p11p.socket) stays systemd's, listening across restarts
        self._owns_socket_path = False
        self._stopping = asyncio.Event()
        self._for_good = False  # SIGINT: no restart follows (run)
        self._reloading = asyncio.Lock()
        self._last_slot = len(self.groups) - 1
        HelperProcess.limit = config.max_helpers
        HelperProcess.adopt_wait = config.adopt_timeout
        self.resume = Resume(self)
        self.takeback = TakeBack(self, self.resume)
        # stopping for a restart: calls not begun are answered "retry" (daemon/server.py)
        self.leaving = False
        self.connections: set[ClientConnection] = set()
        forkserver.enabled = config.fork_server
        self._allowed_cache: dict[tuple[int, int, str], bool] = {}
        for group in self.groups:
            for member in group.members:
                member.on_helper_death = self.member_helper_died

    def member_helper_died(self, member: Member, why: str) -> None:
        self.router.failures.member_failed(member, MemberUnavailable(member.name, why), "(helper exit)")

    # -- start / stop -----------------------------------------------------------------

    async def start(self, inherited: socket.socket | None = None) -> None:
        await asyncio.gather(*(g.start() for g in self.groups))
        for group in self.groups:
            for member in group.members:
                if member.health.state is MemberState.FAILED:
                    self.recovery.start(member)
        await self.takeback.restore()  # the applications of the daemon before, if any
        loop = asyncio.get_running_loop()
        if inherited is not None:
            self._server = await loop.create_unix_server(lambda: ClientConnection(self),
                                                         sock=inherited)
        else:
            path = self.config.socket
            gid = self._socket_gid()
            # a directory of its own: only root and the socket's group get in
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                path.unlink()
            self._server = await loop.create_unix_server(lambda: ClientConnection(self),
                                                         path=str(path))
            os.chmod(path, self.config.socket_mode)
            if gid is not None:
                os.chown(path.parent, -1, gid)
                os.chmod(path.parent, 0o750)
                os.chown(path, -1, gid)
            self._owns_socket_path = True
        await self.admin.start()
        self.health.start()
        self.audit.start()
        log.info("listening on %s; groups: %s", self.config.socket,
                 ", ".join(f"{g.label} (slot {g.slot_id}, {len(g.members)} members)"
                           for g in self.groups))

    def _socket_gid(self) -> int | None:
        name = self.config.socket_group
        if name is None:
            return None
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # SIGTERM (systemd's stop and restart): the applications' helpers wait for the
        # next daemon; SIGINT (Ctrl-C): a stop for good, their sessions end
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stop_for_good)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        await self._stopping.wait()
        if self.resume.enabled and not self._for_good \
                and any(not c.closed for c in self.contexts.values()):
            await self.leave()
            return
        await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    def _stop_for_good(self) -> None:
        self._for_good = True
        self._stopping.set()

    async def stop(self) -> None:
        log.info("stopping")
        if self._server is not None:
            self._server.close()
        await self.health.stop()
        await self.recovery.stop()
        self.standby.stop()
        await self.admin.stop()
        await asyncio.gather(*(c.close() for c in list(self.contexts.values())),
                             return_exceptions=True)
        self.contexts.clear()
        await asyncio.gather(*(g.stop() for g in self.groups), return_exceptions=True)
        await forkserver.close_all()
        self.audit.close()
        if self._owns_socket_path and self.config.socket.is_socket():
            try:
                self.config.socket.unlink()
            except OSError:
                pass

    async def leave(self) -> None:
        """Stops for a restart: the calls under way end and are answered, the others
        are answered "retry" (the client library sends them to the next daemon); the
        state files are written and the applications' helpers stay, waiting for the
        next daemon (daemon/resume.py). The caller ends the process without closing
        anything more (an event loop's end would kill child processes)."""
        self.leaving = True
        log.info("stopping for a restart: %d applications' helpers wait up to %g s for "
                 "the next daemon", len(self.contexts), self.config.adopt_timeout)
        if self._server is not None:
            self._server.close()
        if self._owns_socket_path and self.config.socket.is_socket():
            try:  # clients wait for the next daemon's socket
                self.config.socket.unlink()
            except OSError:
                pass
        limit = asyncio.get_running_loop().time() + max(
            (g.config.call_timeout for g in self.groups), default=5.0) + 1.0
        while any(c.busy for c in self.connections) \
                and asyncio.get_running_loop().time() < limit:
            await asyncio.sleep(0.01)
        await self.health.stop()
        await self.recovery.stop()
        self.standby.stop()
        await self.admin.stop()
        self.resume.flush()  # replies held for their state files
        await asyncio.gather(*(self.resume.keepers(c) for c in self.contexts.values()
                               if not c.closed), return_exceptions=True)
        # helpers told ADOPTABLE just now (keepers, a first call) answer before the
        # state files list them and the fork servers go
        await asyncio.gather(*(h.outlives(ADOPT_TIMEOUT) for c in self.contexts.values()
                               for _, h in c.live_helpers() if h.adopt is not None))
        self.resume.save_all()
        log.info("state files written %d times, %.1f ms in all", self.resume.writes,
                 self.resume.write_seconds * 1000)
        for ctx in self.contexts.values():
            for _, helper in ctx.live_helpers():
                if helper.adopt is not None:
                    helper.leave()
                else:
                    await helper.stop()
        for conn in list(self.connections):
            conn.close()
        await asyncio.gather(*(g.stop() for g in self.groups), return_exceptions=True)
        forkserver.abandon_all()
        self.audit.close()

    # -- contexts ---------------------------------------------------------------------

    def admit(self, pid: int, uid: int, gid: int) -> str | None:
        """A reason to refuse a new connection, or None. A client no group allows is
        let in (it sees no slot) but logged."""
        probe = ApplicationContext((pid, b""), uid, gid, pid, "", self.counter)
        if self.groups and not any(self.allowed(probe, g) for g in self.groups):
            log.warning("access refused: uid=%d pid=%d: no group allows this user", uid, pid)
        return None

    def attach(self, pid: int, uid: int, gid: int, ctx_id: bytes, prog: str,
               resume: hello.Resumption | None = None) -> ApplicationContext:
        key = (pid, ctx_id)
        ctx = self.contexts.get(key)
        if ctx is None:
            # a context whose helpers all died before the daemon before did: its client
            # library keeps the key and the logins (daemon/resume.py)
            ctx = self.takeback.claim(pid, uid, ctx_id, resume)
            if ctx is not None:
                self.contexts[key] = ctx
        elif resume is not None:
            self.takeback.relogin(ctx, resume)
        if ctx is None:
            # a context of this process a restarted daemon took back, and that its client
            # library has not come back to: the library was finalized meanwhile (one
            # instance per process), so it never will
            for old in [c for c in self.contexts.values()
                        if c.pid == pid and c.waiting and c.connections == 0]:
                log.info("%s: its application initialized again; it ends", old.name)
                if old.grace is not None:
                    old.grace.cancel()
                    old.grace = None
                asyncio.ensure_future(self.end_context(old))
        if ctx is None or ctx.closed:
            ctx = ApplicationContext(key, uid, gid, pid, prog, self.counter)
            same_uid = sum(1 for c in self.contexts.values() if c.uid == uid and not c.over_limit)
            self.contexts[key] = ctx
            log.info("%s started (uid=%d prog=%s)", ctx.name, uid, prog or "?")
            if same_uid >= self.config.max_apps_per_uid:
                ctx.over_limit = "max_apps_per_uid"
                log.warning("limit reached: %s uid=%d: max_apps_per_uid = %d; its calls get "
                            "CKR_HOST_MEMORY", ctx.name, uid, self.config.max_apps_per_uid)
        if ctx.grace is not None:
            ctx.grace.cancel()
            ctx.grace = None
        ctx.waiting = False
        ctx.connections += 1
        return ctx

    def detach(self, ctx: ApplicationContext) -> None:
        ctx.connections -= 1
        if ctx.connections > 0 or ctx.closed:
            return
        if _pid_alive(ctx.pid) and self.config.context_grace > 0:
            loop = asyncio.get_running_loop()
            ctx.grace = loop.call_later(self.config.context_grace, self.expire_context, ctx)
            # an application being killed closes its sockets before it is gone: look
            # again shortly, so its context does not wait out the grace period
            loop.call_later(0.2, self._recheck, ctx)
        else:
            asyncio.ensure_future(self.end_context(ctx))

    def _recheck(self, ctx: ApplicationContext) -> None:
        if ctx.connections == 0 and not ctx.closed and ctx.grace is not None \
                and not _pid_alive(ctx.pid):
            ctx.grace.cancel()
            ctx.grace = None
            asyncio.ensure_future(self.end_context(ctx))

    def expire_context(self, ctx: ApplicationContext) -> None:
        ctx.grace = None
        if ctx.connections == 0:
            asyncio.ensure_future(self.end_context(ctx))

    async def end_context(self, ctx: ApplicationContext) -> None:
        if self.contexts.get(ctx.key) is ctx:
            del self.contexts[ctx.key]
        self.standby.forget(ctx)
        self.resume.forget(ctx)
        await ctx.close()
        self.audit.app_ended(ctx)  # its key-use counts, and what is buffered

    # -- reload -----------------------------------------------------------------------

    async def reload(self) -> list[str]:
        """Re-reads the token files. A changed group is changed in place and keeps its
        sessions (reconfig.py); removed groups are retired (their sessions end); new
        groups start.
        A configuration that does not validate is refused: the old one stays. Settings of
        [daemon] itself (sockets, limits) need a restart."""
        async with self._reloading:
            try:
                fresh = load(self.config.file)
            except ConfigError as exc:
                log.error("reload refused, the running configuration stays: %s",
                          "; ".join(exc.errors))
                return exc.errors
            old = {g.label: g for g in self.groups}
            groups: list[Group] = []
            started: list[Group] = []
            for gc in fresh.groups:
                prev = old.pop(gc.label, None)
                if prev is not None:
                    if prev.config != gc:  # applied in place: its sessions go on
                        changes = await reconfig.apply(self, prev, gc)
                        log.info("reload: group %s changed (slot %d): %s", gc.label,
                                 prev.slot_id, ", ".join(changes) or "formatting only")
                    groups.append(prev)
                    continue
                slot = self._take_slot()
                group = Group(gc, slot, self.config.helper_pool, self.config.max_frame)
                for member in group.members:
                    member.on_helper_death = self.member_helper_died
                groups.append(group)
                started.append(group)
                log.info("reload: group %s added (slot %d)", gc.label, slot)
            for prev in old.values():
                await self._retire(prev)
                log.info("reload: group %s removed (slot %d)", prev.label, prev.slot_id)
            self.groups = sorted(groups, key=lambda g: g.slot_id)
            self.slots = {g.slot_id: g for g in self.groups}
            self.config = dataclasses.replace(self.config, groups=tuple(g.config for g in self.groups))
            self._allowed_cache.clear()
            await asyncio.gather(*(g.start() for g in started))
            for group in started:
                for member in group.members:
                    if member.health.state is MemberState.FAILED:
                        self.recovery.start(member)
                self.slot_event(group)
            await self.health.stop()  # the probes follow the groups as they are now
            self.health.start()
            log.info("reload done: %d groups", len(self.groups))
            return []

    def _take_slot(self) -> int:
        slot = max([g.slot_id for g in self.groups] + [self._last_slot]) + 1
        self._last_slot = slot
        return slot

    async def _retire(self, group: Group) -> None:
        """Ends a group that left the configuration: its sessions and helpers go."""
        for ctx in self.contexts.values():
            for vs in [vs for vs in ctx.sessions.values() if vs.group is group]:
                ctx.forget_session(vs)
            ctx.logins.pop(group, None)
            for member in group.members:
                ctx.forget_member(member)
        for member in group.members:
            task = self.recovery.tasks.pop(member, None)
            if task is not None:
                task.cancel()
            member.mark(MemberState.DISABLED)
        self.slot_event(group)
        await group.stop()

    # -- maintenance ------------------------------------------------------------------

    async def drain(self, member: Member) -> int:
        """No new work for `member`; idle sessions leave it now, busy ones at their next
        operation boundary. Returns how many sessions left at once."""
        if member.health.state is MemberState.OK:
            member.mark(MemberState.DRAINING)
            log.warning("member draining: group=%s member=%s", member.group.label, member.name)
            member.group.notify()  # a member held out waits no longer for this one (recovery)
        moved = 0
        for ctx in list(self.contexts.values()):
            for vs in ctx.sessions.values():
                # a bound one may run operations of the data plane here that the daemon
                # has not seen: its binding ends, and its client hands them over as they
                # run at its next call (moved now, they would have to be sent again,
                # which fails when their key was destroyed since); it leaves then, as a
                # busy one does
                if vs.member is member and vs.direct is not None:
                    await self.direct.revoke(vs)
                left = vs.left
                if (vs.member is member and left is not None and left.member is member
                        and vs.real.get(member) == left.real):
                    continue
                # sessions served elsewhere may keep an idle member session here too
                if member in vs.real and (vs.member is not member or vs.idle):
                    await self.router.bind.leave(ctx, vs, member)
                    moved += 1
            await self.router.bind.close_utility(ctx, member)
        return moved

    def enable(self, member: Member) -> None:
        state = member.health.state
        if state is MemberState.DRAINING:
            member.mark(MemberState.OK)
            member.group.notify()
            self.direct.member_back(member)
            self.standby.member_back(member)
        elif state in (MemberState.DISABLED, MemberState.FAILED):
            member.mark(MemberState.FAILED)
            self.recovery.start(member, at_once=True)
        log.warning("member enabled: group=%s member=%s", member.group.label, member.name)

    def slot_event(self, group: Group) -> None:
        """The group's token came or went: tell the applications that wait for it."""
        for ctx in self.contexts.values():
            if self.allowed(ctx, group):
                ctx.events.put_nowait(group.slot_id)

    # -- access -----------------------------------------------------------------------

    def allowed(self, ctx: ApplicationContext, group: Group) -> bool:
        users, groups = group.config.allow_users, group.config.allow_groups
        if not users and not groups:
            return True
        key = (ctx.uid, ctx.gid, group.label)
        cached = self._allowed_cache.get(key)
        if cached is None:
            cached = self._check_access(ctx.uid, ctx.gid, users, groups)
            self._allowed_cache[key] = cached
        return cached

    @staticmethod
    def _check_access(uid: int, gid: int, users: tuple[str, ...], groups: tuple[str, ...]) -> bool:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = None
        if str(uid) in users or (name is not None and name in users):
            return True
        gids = {gid}
        if name is not None:
            gids.update(os.getgrouplist(name, gid))
        for g in gids:
            try:
                gname: str | None = grp.getgrgid(g).gr_name
            except KeyError:
                gname = None
            if str(g) in groups or (gname is not None and gname in groups):
                return True
        return False

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        groups = []
        for g in self.groups:
            st = g.status()
            for m, ms in zip(g.members, st["members"], strict=True):
                ms["sessions"] = sum(c.sessions_on(m) for c in self.contexts.values())
            groups.append(st)
        return {"groups": groups, "contexts": [c.status() for c in self.contexts.values()]}
