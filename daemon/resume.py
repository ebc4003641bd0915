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

Taking them back (at the start, and at a hello that brings a key) is daemon/takeback.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import io
import logging
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from p11p.daemon.context import ApplicationContext
from p11p.daemon.handles import HandleCounter
from p11p.daemon.helperproc import AdoptedHelper, HelperProcess
from p11p.daemon.members import Group, Member
from p11p.daemon.shapes import CODE
from p11p.daemon.virtual import ObjectIdentity
from p11p.protocol import spec

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


# calls whose reply may start an operation or a search of a session, or take over one
# begun on the data plane: a daemon taking over must know it runs (else the operation's
# next call would get CKR_OPERATION_NOT_INITIALIZED where the member still runs it).
# Answered once the state file has them, as a handle's change. An operation's updates and
# end go lazily (a kill in between: an update's data missing for a replay, or an
# operation ended on the member still running in the daemon's view, so a daemon taking
# over after a kill replays none: takeback.py; README). FIND_ALL leaves nothing running
# (the client has the results) unless they are too many.
MOVES = frozenset(
    {f.code for f in spec.functions() if f.op_kind and f.op_role == "init"}
    | {spec.own_codes()["DIRECT_ADOPT"].code})


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
        begun on the member, say), which no kill after the answer may find; and so is a
        call that may start an operation or a search (MOVES). The files of the
        contexts whose calls ended in this turn of the loop are written once, at its
        end, then those replies go. Any other call that may have changed the state (an
        operation's update or end, a search served from the context's cache) is answered
        at once and written within LAZY seconds (at most one write per context then): a
        kill in between may lose that (README, Operations)."""
        code = request[0] if request and type(request[0]) is int else None
        if not self.enabled or ctx.closed or code in READ_ONLY:
            send()
            return
        self._dirty.add(ctx)
        self._since.setdefault(ctx, time.monotonic())
        if self.mark(ctx) == before and code not in MOVES:
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

    def save(self, ctx: ApplicationContext, clean: bool = False) -> None:
        """Writes `ctx`'s state file; `clean` at a stop, when nothing changes after it (a
        daemon taking over from any other write may find an operation's end missing:
        takeback.py)."""
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
                                 "helpers": helpers, "clean": clean}, pickle.HIGHEST_PROTOCOL)
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
                self.save(ctx, clean=True)

    def forget(self, ctx: ApplicationContext) -> None:
        """The context ended: its file goes."""
        try:
            self._path(ctx).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s state file not removed: %s", ctx.name, exc)

def _identity(i: ObjectIdentity) -> list[Any]:
    return [i.object_class, i.object_id, i.label, i.key_type, i.application]


def _write(path: Path, data: bytes) -> None:
    """A file of the state directory, 0600: written whole to a new file, which then
    takes the old one's place. It is swapped with it (renameat2 RENAME_EXCHANGE) and
    the old one removed, not renamed over it: on ext4 a rename that replaces a file
    starts writing the new one's blocks out (auto_da_alloc), ten times the cost of the
    whole write (0.3 ms against 0.03). A kill at any point leaves the old file or the
    new one whole, as a rename would; the .tmp a kill between the swap and the unlink
    leaves (the old state) the next write replaces, a restarted daemon removes."""
    tmp = path.with_suffix(".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    if _swap(tmp, path):
        os.unlink(tmp)  # the old file
    else:
        os.replace(tmp, path)


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_swaps = [True]  # False once the file system refused a swap: renames from then on


def _swap(a: Path, b: Path) -> bool:
    """Swaps two files atomically; False when `b` does not exist (the first write) or
    the file system cannot swap."""
    if not _swaps[0]:
        return False
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                       _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err != errno.ENOENT:
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(b))
        _swaps[0] = False
    return False


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("state file %s not removed: %s", path.name, exc)
