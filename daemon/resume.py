"""Daemon restarts that applications do not notice (DESIGN, invariant 6).

An application's helpers outlive the daemon (helper/loop.py, ADOPTABLE): their module
instances keep the member sessions, the login, the session objects and the operations,
and keep serving the data plane. What the daemon knows of each application context
(virtual sessions and objects, what stands behind them and what replay needs, which
helper holds what) is written to a state file in the runtime directory before each
reply that may have changed it, and at a stop. A daemon that starts reads the files,
takes the helpers back over their adoption sockets and waits for the applications'
client libraries, which reconnect with their context id and find their handles where
they left them.

A file is the context's identity and its helpers' adoption names (a pickle of plain
values), then what the context holds, encrypted (AES-256-GCM, the identity as associated
data) with a key of the context's own that only its helpers keep, in locked memory
(ADOPTABLE, KEPT): a file read without a helper of its application is of no use, and what
replay needs (operation data, the recipes of session objects, key values included)
never lies on disk in the clear. The PIN is not in it at all: the helper that logged in
keeps it and hands it over (KEPT). Files are 0600 in a 0700 directory, written whole
and renamed; a file this build cannot read is dropped and its application starts afresh
(logged).

The client library keeps them too (link feature `resume`): the hello's answer gives it
the key, it follows its own logins (client/kept.c: locked memory, wiped at C_Logout and
C_Finalize), and every hello it makes after that carries both. A daemon that took no
helper of a file back (all had died: the application's members failed since its last
call, and the daemon was killed, not stopped) keeps the file pending for as long as it
waits for the application, and opens it with the key of the hello that comes with the
file's context id from the file's process; what stood on the dead helpers is rebuilt
where it is used next, logged in with the logins the hello brought. A login no helper
and no hello brings counts as ended (the application logs in again).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from p11p.daemon import hello
from p11p.daemon.context import ApplicationContext
from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.handles import HandleCounter
from p11p.daemon.helperproc import AdoptedHelper, HelperProcess
from p11p.daemon.members import Group, Member
from p11p.daemon.shapes import CODE
from p11p.daemon.virtual import ObjectIdentity

if TYPE_CHECKING:
    from p11p.daemon.service import Daemon

log = logging.getLogger("p11p.resume")

VERSION = 2
ADOPT_TIMEOUT = 3.0  # seconds to take one helper back
LAZY = 0.01  # seconds a change no reply waits for may wait for its state file
LAZY_MAX = 0.1  # ... at most, while calls of its context keep running
# calls that change nothing the state file holds
READ_ONLY = frozenset(CODE[n] for n in (
    "C_GetInfo", "C_GetSlotList", "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList",
    "C_GetMechanismInfo", "C_GetSessionInfo", "C_GetAttributeValue", "C_GetObjectSize",
    "C_GenerateRandom", "C_SeedRandom", "C_WaitForSlotEvent"))


class _Pending:
    """A file no helper could open: its application's hello brings the key."""

    def __init__(self, path: Path, head: dict[str, Any], head_bytes: bytes, sealed: bytes,
                 timer: asyncio.TimerHandle) -> None:
        self.path, self.head, self.head_bytes, self.sealed = path, head, head_bytes, sealed
        self.timer = timer


def _helper_ref(h: HelperProcess) -> tuple[Any, ...]:
    return (h.member, h.pid, h.adopt, h.fast, h.fast_name)


class _Writer(pickle.Pickler):
    """Members, groups, helpers and the context by reference (reducer_override: unlike
    persistent_id, not asked for the ints, bytes and lists that most of a state is)."""

    def __init__(self, file: io.BytesIO, ctx: ApplicationContext) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.ctx = ctx

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Member):
            return _ref, ("member", obj.group.label, obj.name)
        if isinstance(obj, Group):
            return _ref, ("group", obj.label)
        if isinstance(obj, HelperProcess):
            return _ref, ("helper", obj.member, obj.pid)
        if isinstance(obj, HandleCounter):
            return _ref, ("counter",)
        if obj is self.ctx:
            return _ref, ("ctx",)
        if isinstance(obj, ApplicationContext | asyncio.Future | asyncio.Handle):
            raise pickle.PicklingError(f"not for the state file: {obj!r}")
        return NotImplemented


class _Reader(pickle.Unpickler):
    """Resolves the references of _Writer in the daemon that reads (one load at a time:
    a load does not wait)."""

    current: _Reader | None = None

    def __init__(self, data: bytes, daemon: Daemon, ctx: ApplicationContext,
                 helpers: dict[tuple[str, int], AdoptedHelper]) -> None:
        super().__init__(io.BytesIO(data))
        self.daemon, self.ctx, self.helpers = daemon, ctx, helpers

    def load(self) -> Any:
        _Reader.current = self
        try:
            return super().load()
        finally:
            _Reader.current = None

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name != "_ref":
            raise pickle.UnpicklingError(f"{module}.{name} is not for a state file")
        return super().find_class(module, name)

    def resolve(self, kind: str, *args: Any) -> Any:
        if kind == "member":
            return _member(self.daemon, args[0], args[1])
        if kind == "group":
            return _group(self.daemon, args[0])
        if kind == "helper":
            helper = self.helpers.get((args[0], args[1]))
            if helper is None:  # one that had died (a binding left on it names it)
                helper = self.helpers[(args[0], args[1])] = AdoptedHelper(
                    args[0], self.daemon.config.max_frame, args[1], None, None, None)
            return helper
        if kind == "counter":
            return self.daemon.counter
        if kind == "ctx":
            return self.ctx
        raise pickle.UnpicklingError(f"unknown reference {kind!r}")


def _ref(kind: str, *args: Any) -> Any:
    """A reference _Writer made, resolved by the _Reader that loads it."""
    if _Reader.current is None:
        raise pickle.UnpicklingError("a state file reference outside a state file")
    return _Reader.current.resolve(kind, *args)


def _group(daemon: Daemon, label: str) -> Group:
    for group in daemon.groups:
        if group.label == label:
            return group
    raise pickle.UnpicklingError(f"group {label!r} is gone")


def _member(daemon: Daemon, label: str, name: str) -> Member:
    for member in _group(daemon, label).members:
        if member.name == name:
            return member
    raise pickle.UnpicklingError(f"member {name!r} of {label!r} is gone")


class Resume:
    """The state files of one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.dir: Path = daemon.config.state_dir or daemon.config.socket.parent / "state"
        self.enabled = daemon.config.adopt_timeout > 0
        self.writes = 0
        self.write_seconds = 0.0
        self._dirty: set[ApplicationContext] = set()
        self._since: dict[ApplicationContext, float] = {}  # dirty since (monotonic)
        self._held: list[Callable[[], None]] = []
        self._flushing = False
        self._flush: asyncio.TimerHandle | None = None
        self.pending: dict[tuple[int, bytes], _Pending] = {}
        self._groups_written = -1

    def _ready(self) -> None:
        """The state directory, made 0700 (and made so when it was found otherwise: an
        operator's `mkdir` leaves it 0755); one of another user is refused."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.dir.stat()
        if info.st_uid != os.geteuid():
            raise OSError(f"{self.dir} belongs to uid {info.st_uid}, not to the daemon's")
        if info.st_mode & 0o777 != 0o700:
            log.warning("state directory %s was mode %o: made 0700", self.dir,
                        info.st_mode & 0o777)
            os.chmod(self.dir, 0o700)

    def _path(self, ctx: ApplicationContext) -> Path:
        return self.dir / f"{ctx.pid}-{ctx.key[1].hex()}.state"

    # -- writing ----------------------------------------------------------------------

    def mark(self, ctx: ApplicationContext) -> tuple[int, int, int]:
        """Before a call: what tells whether it gave or ended a handle, or a login, or
        whether the context's file was written while it ran."""
        return self.daemon.counter.changes, len(ctx.logins), ctx.saves

    def answer(self, ctx: ApplicationContext, request: Any, before: tuple[int, int, int],
               send: Callable[[], None]) -> None:
        """After a call of `ctx`, its reply (`send`). A call that gave or ended a handle
        (a session, an object) or a login is answered once the state file has it: a
        kill after the answer finds it there. So is a call during which the file was
        written (a write for another call): that file holds the call half done (a search
        begun on the member, say), which no kill after the answer may find. The files of the contexts whose calls ended
        in this turn of the loop are written once, at its end, then those replies go.
        Any other call that may have changed the state (an operation's progress, a
        search served from the context's cache) is answered at once and written within
        LAZY seconds (at most one write per context then): a kill in between may lose
        that (README, Operations)."""
        if not self.enabled or ctx.closed or (
                request and type(request[0]) is int and request[0] in READ_ONLY):
            send()
            return
        self._dirty.add(ctx)
        self._since.setdefault(ctx, time.monotonic())
        if self.mark(ctx) == before:
            send()
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(LAZY, self.flush)
            return
        self._held.append(send)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flushing = False
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        dirty, self._dirty = self._dirty, set()
        held, self._held = self._held, []
        now = time.monotonic()
        self.save_groups()
        for ctx in dirty:
            if not held and ctx.in_flight and not ctx.closed \
                    and now - self._since.get(ctx, now) < LAZY_MAX:
                # a write now would hold a call of it half done (and hold its answer
                # back: answer): a little later, when none runs
                self._dirty.add(ctx)
                continue
            self._since.pop(ctx, None)
            if not ctx.closed:
                self.save(ctx)
        if self._dirty and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(LAZY, self.flush)
        for send in held:
            send()

    # -- what the groups know beyond any one application --------------------------------

    def save_groups(self) -> None:
        """groups.state: where token objects written through p11p to one member live,
        and which were destroyed (members.py, Group.homes): what a member out of service
        holds is not known, so without them a restarted daemon would refuse writes to
        such objects while one is out. Plain values (object identities: class, id,
        label, key type, application, as in the audit log); written when they change."""
        version = sum(g.written for g in self.daemon.groups)
        if version == self._groups_written:
            return
        groups = {}
        for g in self.daemon.groups:
            groups[g.label] = {
                "homes": [[*_identity(i), m.name] for i, m in g.homes.items()],
                "destroyed": [_identity(i) for i in g.destroyed],
                "while_out": {m.name: [_identity(i) for i in ids]
                              for m, ids in g.destroyed_while_out.items()}}
        try:
            self._ready()
            _write(self.dir / "groups.state", msgpack.packb({"version": VERSION,
                                                             "groups": groups}))
            self._groups_written = version
        except (OSError, TypeError, ValueError) as exc:
            log.warning("groups.state not written: %s", exc)

    def _restore_groups(self) -> None:
        path = self.dir / "groups.state"
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

    def save(self, ctx: ApplicationContext) -> None:
        began = time.perf_counter()
        ctx.saves += 1
        adoptable = {m: h for m, h in ctx.live_helpers() if h.adopt is not None}
        helpers = [(m.group.label, m.name, _helper_ref(h)) for m, h in adoptable.items()]
        state = {
            "sessions": ctx.sessions.items(), "objects": ctx.objects.items(),
            "by_real": ctx.by_real, "token_index": ctx.token_index,
            # the user type only: the PIN stays with the helper that logged in
            "logins": {g: login[0] for g, login in ctx.logins.items()},
            "logged_in": ctx.logged_in, "utility": ctx.utility,
            "helpers": adoptable,
            "counter": self.daemon.counter.position,
        }
        try:
            head = pickle.dumps({"version": VERSION, "key": ctx.key, "uid": ctx.uid,
                                 "gid": ctx.gid, "pid": ctx.pid, "prog": ctx.prog,
                                 "helpers": helpers}, pickle.HIGHEST_PROTOCOL)
            body = io.BytesIO()
            _Writer(body, ctx).dump(state)
            nonce = os.urandom(12)
            sealed = AESGCM(ctx.state_key).encrypt(nonce, body.getvalue(), head)
            self._ready()
            _write(self._path(ctx), len(head).to_bytes(4, "big") + head + nonce + sealed)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
            log.warning("%s state file not written: %s", ctx.name, exc)
        self.writes += 1
        self.write_seconds += time.perf_counter() - began

    async def keepers(self, ctx: ApplicationContext) -> None:
        """Before a stop: each group the application is logged in on, or has sessions on,
        gets a helper that outlives the daemon, keeping the state key and the login, when
        none of its helpers there lives (its members failed since its last call): else
        the next daemon could not read its file, or log it in again."""
        groups = {vs.group for vs in ctx.sessions.values()} | set(ctx.logins)
        alive = {m.group for m, h in ctx.live_helpers() if h.adopt is not None}
        for group in groups - alive:
            member = next((m for m in group.members if m.usable), None)
            if member is None:
                log.warning("%s group=%s: no member to keep its state with", ctx.name,
                            group.label)
                continue
            try:
                helper = await ctx.helper(member, time.monotonic() + ADOPT_TIMEOUT)
                login = ctx.logins.get(group)
                if login is not None:
                    await helper.keep(login[0], login[1], ADOPT_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - the stop goes on; logged
                log.warning("%s group=%s: no helper keeps its state: %r", ctx.name,
                            group.label, exc)

    def save_all(self) -> None:
        self.save_groups()
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
        self._restore_groups()
        files = sorted(p for p in self.dir.glob("*.state") if p.name != "groups.state")
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
        state = (self._open(ctx, state_key, rest, head_bytes, helpers)
                 if state_key is not None else None)
        if state is None or not _pid_alive(ctx.pid) or ctx.key in daemon.contexts:
            log.info("restart: %s not taken back (%s); its helpers end", ctx.name,
                     "its application is gone" if state is not None
                     else "no helper kept its key")
            await asyncio.gather(*(h.stop() for h in taken.values()), return_exceptions=True)
            return False
        self._take(ctx, state, taken, kept)
        ctx.waiting = True
        daemon.contexts[ctx.key] = ctx
        self.save(ctx)  # as taken back: a kill before its next call finds it again
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
              helpers: dict[tuple[str, int], AdoptedHelper]) -> dict[str, Any] | None:
        """The file's contents, opened with `key` into `ctx` (None: not readable)."""
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
            state = self._open(ctx, resume.key, pending.sealed, pending.head_bytes, {})
        if state is None:
            log.info("restart: %s starts afresh (%s)", ctx.name,
                     "its hello brought no key" if resume is None else "not readable")
            _unlink(pending.path)
            return None
        self._take(ctx, state, {}, [])
        self.relogin(ctx, resume)
        self.save(ctx)
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


def _identity(i: ObjectIdentity) -> list[Any]:
    return [i.object_class, i.object_id, i.label, i.key_type, i.application]


def _write(path: Path, data: bytes) -> None:
    """A file of the state directory, 0600, written whole and renamed."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("state file %s not removed: %s", path.name, exc)


def _pid_alive(pid: int) -> bool:
    from p11p.daemon.service import _pid_alive as alive
    return alive(pid)
