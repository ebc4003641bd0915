"""The audit log: who logged in, which objects were made, destroyed or made again on
another member, what happened to members, and which keys each application used.

`[daemon] audit_log` names a file (JSON lines, appended, created 0600) or "journal"
(the systemd journal through `systemd.journal` when it is importable, else syslog with
the ident p11p-audit). Each record is one JSON object with "time" (ISO 8601, UTC) and
"event". Objects are named by identity (class, label, CKA_ID, key type), never by a
value; a login by user type and result, never its PIN.

Records are buffered and written within a second (key uses are counted per application,
key, operation and mechanism, and written every `audit_interval` seconds and when the
application ends), so the event loop never waits on the log. A log that cannot be
written costs its records and one error line, never a call.

The daemon owns its Audit (`Daemon.audit`); with no `audit_log` it is the null Audit,
whose methods do nothing, so each call site is one line. Member.mark, which has no way
to the daemon, reaches it through `installed()`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import syslog
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from p11p.protocol.constants import CKK, CKO, CKU, mech_name, rv_name

if TYPE_CHECKING:
    from p11p.daemon.config import DaemonConfig
    from p11p.daemon.context import ApplicationContext
    from p11p.daemon.members import Group, Member, MemberState
    from p11p.daemon.shapes import CallShape
    from p11p.daemon.virtual import VirtualObject, VirtualSession

log = logging.getLogger("p11p.audit")

JOURNAL = "journal"
SOON = 1.0  # seconds a record waits in the buffer at most (key-use counts excepted)
BUFFER_MAX = 1 << 16  # bytes buffered before a write at once
_CLASS_NAMES = {v: k for k, v in reversed(CKO.items())}
_KEY_NAMES = {v: k for k, v in reversed(CKK.items())}
_USER_NAMES = {v: k for k, v in CKU.items()}


def _name(names: dict[int, str], value: int | None, prefix: str) -> str | None:
    if value is None:
        return None
    return names.get(value, f"{prefix}{value:#x}")


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def identity(vobj: VirtualObject) -> dict[str, Any]:
    """An object as the log names it: its identity, never an attribute value."""
    ident = vobj.identity
    if ident is None:  # its attributes could not be read
        return {"class": None, "label": None, "id": None, "key_type": None}
    out: dict[str, Any] = {
        "class": _name(_CLASS_NAMES, ident.object_class, "CKO_"),
        "label": _text(ident.label),
        "id": None if ident.object_id is None else ident.object_id.hex(),
        "key_type": _name(_KEY_NAMES, ident.key_type, "CKK_"),
    }
    if ident.application is not None:
        out["application"] = _text(ident.application)
    return out


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


class Audit:
    """The null audit log (no `audit_log`): every record is dropped."""

    enabled = False

    @staticmethod
    def create(config: DaemonConfig) -> Audit:
        """The daemon's audit log. A file that cannot be opened stops the start."""
        if config.audit_log is None:
            return Audit()
        if config.audit_log == JOURNAL:
            return AuditLog(_JournalSink(), config.audit_interval)
        try:
            sink: _Sink = _FileSink(config.audit_log)
        except OSError as exc:
            raise SystemExit(f"p11p: {config.file}: daemon.audit_log: cannot open "
                             f"{config.audit_log}: {exc.strerror}") from None
        return AuditLog(sink, config.audit_interval)

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None

    def login(self, ctx: ApplicationContext, group: Group, user_type: int, rv: int) -> None:
        return None

    def logout(self, ctx: ApplicationContext, group: Group, rv: int) -> None:
        return None

    def created(self, ctx: ApplicationContext, group: Group, function: str,
                made: Iterable[VirtualObject | None], member: Member,
                sources: Iterable[VirtualObject]) -> None:
        return None

    def destroyed(self, ctx: ApplicationContext, group: Group, vobj: VirtualObject,
                  served: Member | None) -> None:
        return None

    def replicated(self, ctx: ApplicationContext, group: Group, vobj: VirtualObject,
                   member: Member) -> None:
        return None

    def member_state(self, member: Member, old: MemberState, new: MemberState,
                     rv: int | None, why: str) -> None:
        return None

    def operation(self, vs: VirtualSession, op: str, shape: CallShape, vreq: list[Any]) -> None:
        return None

    def direct_key(self, ctx: ApplicationContext, vs: VirtualSession, vobj: VirtualObject) -> None:
        return None

    def app_ended(self, ctx: ApplicationContext) -> None:
        return None


_installed: Audit = Audit()


def installed() -> Audit:
    """The running daemon's audit log (the null one when there is none)."""
    return _installed


def install(audit: Audit) -> None:
    global _installed
    _installed = audit


class _Sink:
    where = ""

    def write(self, records: list[str]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class _FileSink(_Sink):
    def __init__(self, path: str) -> None:
        self.where = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, records: list[str]) -> None:
        data = "".join(line + "\n" for line in records).encode()
        while data:
            done = os.write(self.fd, data)
            data = data[done:]

    def close(self) -> None:
        os.close(self.fd)


class _JournalSink(_Sink):
    """The systemd journal (python3-systemd), else syslog (ident p11p-audit)."""

    def __init__(self) -> None:
        try:
            self.journal: Any = importlib.import_module("systemd.journal")
            self.where = "the systemd journal"
        except ImportError:
            self.journal = None
            self.where = "syslog (ident p11p-audit)"
            syslog.openlog("p11p-audit", syslog.LOG_PID, syslog.LOG_AUTHPRIV)

    def write(self, records: list[str]) -> None:
        for line in records:
            if self.journal is not None:
                self.journal.send(line, SYSLOG_IDENTIFIER="p11p-audit",
                                  PRIORITY=str(syslog.LOG_INFO))
            else:
                syslog.syslog(syslog.LOG_INFO, line)

    def close(self) -> None:
        if self.journal is None:
            syslog.closelog()


# (group, key identity as JSON, token object, operation, mechanism, path) -> count
_UseKey = tuple[str, str, bool | None, str, str | None, str]


class AuditLog(Audit):
    enabled = True

    def __init__(self, sink: _Sink, interval: float) -> None:
        self.sink = sink
        self.interval = interval
        self.buffer: list[str] = []
        self.size = 0
        self.uses: dict[ApplicationContext, dict[_UseKey, int]] = {}
        self.apps: dict[ApplicationContext, dict[str, Any]] = {}
        self._soon: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self.failing = False
        self.closed = False

    # -- writing ----------------------------------------------------------------------

    def start(self) -> None:
        log.info("audit log: %s (key uses every %g s)", self.sink.where, self.interval)
        self._tick = asyncio.get_running_loop().call_later(self.interval, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = asyncio.get_running_loop().call_later(self.interval, self._on_tick)
        for ctx in list(self.uses):
            self._uses_out(ctx)
        self.flush()

    def emit(self, event: str, **fields: Any) -> None:
        if self.closed:
            return
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = json.dumps({"time": now, "event": event, **fields}, separators=(",", ":"))
        self.buffer.append(line)
        self.size += len(line) + 1
        if self.size >= BUFFER_MAX:
            self.flush()
        elif self._soon is None:
            try:
                self._soon = asyncio.get_running_loop().call_later(SOON, self.flush)
            except RuntimeError:  # no loop (closing): at once
                self.flush()

    def flush(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        records, self.buffer, self.size = self.buffer, [], 0
        if not records:
            return
        try:
            self.sink.write(records)
        except (OSError, ValueError) as exc:
            if not self.failing:
                self.failing = True
                log.error("audit log: cannot write to %s: %s; records are lost until it "
                          "can be written", self.sink.where, exc)
            return
        if self.failing:
            self.failing = False
            log.warning("audit log: %s written again", self.sink.where)

    def close(self) -> None:
        if self.closed:
            return
        for handle in (self._tick, self._soon):
            if handle is not None:
                handle.cancel()
        self._tick = None
        for ctx in list(self.uses):
            self._uses_out(ctx)
        self.flush()
        self.closed = True
        try:
            self.sink.close()
        except OSError:
            pass

    # -- records ----------------------------------------------------------------------

    def _app(self, ctx: ApplicationContext) -> dict[str, Any]:
        app = self.apps.get(ctx)
        if app is None:
            app = self.apps[ctx] = {"uid": ctx.uid, "pid": ctx.pid, "exe": _exe(ctx.pid),
                                    "prog": ctx.prog, "ctx": ctx.key[1][:4].hex()}
        return app

    def login(self, ctx: ApplicationContext, group: Group, user_type: int, rv: int) -> None:
        self.emit("login", app=self._app(ctx), group=group.label,
                  user_type=_name(_USER_NAMES, user_type, "CKU_"), rv=rv_name(rv))

    def logout(self, ctx: ApplicationContext, group: Group, rv: int) -> None:
        self.emit("logout", app=self._app(ctx), group=group.label, rv=rv_name(rv))

    def created(self, ctx: ApplicationContext, group: Group, function: str,
                made: Iterable[VirtualObject | None], member: Member,
                sources: Iterable[VirtualObject]) -> None:
        named = [identity(s) for s in sources]
        for vobj in made:
            if vobj is not None:
                self.emit("object_created", app=self._app(ctx), group=group.label,
                          function=function, object=identity(vobj), token=vobj.is_token,
                          members=[member.name], **({"sources": named} if named else {}))

    def destroyed(self, ctx: ApplicationContext, group: Group, vobj: VirtualObject,
                  served: Member | None) -> None:
        # a token object goes from the member that holds it; a session object from
        # every member where p11p made it
        members: list[Member | None] = [vobj.home] if vobj.home is not None else \
            list(vobj.real) or [served]
        self.emit("object_destroyed", app=self._app(ctx), group=group.label,
                  object=identity(vobj), token=vobj.is_token,
                  members=[m.name for m in members if m is not None])

    def replicated(self, ctx: ApplicationContext, group: Group, vobj: VirtualObject,
                   member: Member) -> None:
        self.emit("object_replicated", app=self._app(ctx), group=group.label,
                  object=identity(vobj), token=vobj.is_token, members=[member.name])

    def member_state(self, member: Member, old: MemberState, new: MemberState,
                     rv: int | None, why: str) -> None:
        if old is new:
            return
        self.emit("member_state", group=member.group.label, member=member.name,
                  old=old.value, new=new.value, rv=None if rv is None else rv_name(rv),
                  error=why)

    def operation(self, vs: VirtualSession, op: str, shape: CallShape, vreq: list[Any]) -> None:
        if not shape.objects:
            return  # no key (digest)
        vobj = vs.context.objects.find(vreq[shape.objects[0]])
        if vobj is None:
            return
        mech = vreq[shape.mechanism] if shape.mechanism is not None else None
        mechanism = mech_name(mech[0]) if isinstance(mech, list) and mech \
            and isinstance(mech[0], int) else None
        self._use(vs.context, vs.group, vobj, op, mechanism, "daemon")

    def direct_key(self, ctx: ApplicationContext, vs: VirtualSession, vobj: VirtualObject) -> None:
        # the client library asks once per key and bound session (C_SignInit on the
        # data plane); the signatures themselves do not pass the daemon
        self._use(ctx, vs.group, vobj, "sign", None, "direct")

    def _use(self, ctx: ApplicationContext, group: Group, vobj: VirtualObject, op: str,
             mechanism: str | None, path: str) -> None:
        if self.closed:
            return
        key = (group.label, json.dumps(identity(vobj)), vobj.is_token, op, mechanism, path)
        counts = self.uses.setdefault(ctx, {})
        counts[key] = counts.get(key, 0) + 1

    def _uses_out(self, ctx: ApplicationContext) -> None:
        for (group, key, token, op, mechanism, path), count in self.uses.pop(ctx, {}).items():
            self.emit("key_use", app=self._app(ctx), group=group, key=json.loads(key),
                      token=token, op=op, mechanism=mechanism, path=path, count=count)

    def app_ended(self, ctx: ApplicationContext) -> None:
        self._uses_out(ctx)
        self.apps.pop(ctx, None)
        self.flush()
