"""Configuration: the main file (`[daemon]`) and one file per virtual token.

Everything is validated here, once, with errors that name the file, the line and the
key; the rest of the daemon works on the typed result. tomllib gives no positions for
keys, so `_Locator` finds them in the text (tables, arrays of tables, keys).
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p11p.daemon.uri import URIError
from p11p.daemon.uri import parse as parse_uri
from p11p.protocol.constants import CKR

DEFAULT_CONFIG = Path("/etc/p11p/p11p.toml")
DEFAULT_SOCKET = "/run/p11p/p11p.sock"
POLICIES = ("failover", "balance")
WRITE_POLICIES = ("primary", "refuse", "all")
RV_CLASSES = ("application", "session_lost", "member_failed")


class ConfigError(Exception):
    """One or more configuration errors, each `file:line: key: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Recovery:
    interval: float = 5.0
    attempts: int = 0  # 0: forever
    # a member that fails again within this long of its return is held out twice as
    # long as the last time (from `interval`), up to this
    max_interval: float = 300.0


PROBES = ("token-info", "sign")


@dataclass(frozen=True)
class Health:
    interval: float = 10.0  # seconds between probes of each member in service; 0: off
    probe: str = "token-info"  # C_GetTokenInfo and a member session; or "sign"
    probe_key: str | None = None  # with "sign": the label of a key usable without login


@dataclass(frozen=True)
class MemberConfig:
    name: str
    module: str
    token: str | None
    serial: str | None
    env: dict[str, str]
    weight: int = 1
    manufacturer: str | None = None
    model: str | None = None
    slot: int | None = None


@dataclass(frozen=True)
class GroupConfig:
    label: str
    file: Path
    policy: str
    write_policy: str
    members: tuple[MemberConfig, ...]
    call_timeout: float = 30.0
    hold_timeout: float = 10.0
    replay_limit: int = 1 << 20
    object_cache_ttl: float = 5.0
    direct_calls: bool = True
    # a logged-in application logged in on every member in service (daemon/standby.py)
    standby_logins: bool = True
    recovery: Recovery = field(default_factory=Recovery)
    health: Health = field(default_factory=Health)
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    rv_classes: dict[int, str] = field(default_factory=dict)
    # write_policy = "all": the label of an AES key on every member (CKA_WRAP, CKA_UNWRAP)
    # that a generated token key is wrapped with on its member and unwrapped on the others
    replicate_with: str | None = None


@dataclass(frozen=True)
class DaemonConfig:
    file: Path
    socket: Path
    admin_socket: Path
    tokens_dir: Path
    log_level: str = "info"
    socket_group: str | None = None
    socket_mode: int = 0o660
    max_frame: int = 16 * 1024 * 1024
    helper_pool: int = 1
    fork_server: bool = True  # helpers forked by a fork server per member (daemon/forkserver.py)
    context_grace: float = 5.0
    # seconds an application's helper waits for a restarted daemon to take it back
    # (daemon/resume.py); 0: helpers end with the daemon
    adopt_timeout: float = 30.0
    # the applications' state files (daemon/resume.py); None: "state" beside the socket
    state_dir: Path | None = None
    max_sessions_per_app: int = 1024
    max_apps_per_uid: int = 64
    max_calls_per_app: int = 64
    max_helpers: int = 512
    audit_log: str | None = None  # a file's absolute path, or "journal" (daemon/audit.py)
    audit_interval: float = 60.0  # seconds between writes of the key-use counts
    groups: tuple[GroupConfig, ...] = ()


class _Locator:
    """Finds the line of a key inside a table of a TOML text."""

    _header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"]+)\s*\]\]?")
    _key = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        # (table path with array index, key) -> line
        self.lines: dict[tuple[str, str], int] = {}
        self.tables: dict[str, int] = {}
        counts: dict[str, int] = {}
        table = ""
        for number, line in enumerate(text.splitlines(), 1):
            h = self._header.match(line)
            if h:
                name = h.group(2).replace('"', "")
                if h.group(1) == "[[":
                    index = counts.get(name, 0)
                    counts[name] = index + 1
                    table = f"{name}[{index}]"
                else:
                    table = name
                self.tables.setdefault(table, number)
                continue
            k = self._key.match(line)
            if k:
                self.lines.setdefault((table, k.group(1).strip('"')), number)

    def at(self, table: str, key: str | None = None) -> str:
        line = self.lines.get((table, key)) if key else None
        if line is None:
            line = self.tables.get(table, 1)
        where = f"{table}.{key}" if table and key else (key or table or "(top)")
        return f"{self.path}:{line}: {where}"


class _Reader:
    """Typed access to one table, collecting errors instead of stopping at the first."""

    def __init__(self, loc: _Locator, table: str, data: dict[str, Any], errors: list[str],
                 known: set[str]) -> None:
        self.loc, self.table, self.data, self.errors = loc, table, data, errors
        for key in data:
            if key not in known:
                errors.append(f"{loc.at(table, key)}: unknown key")

    def error(self, key: str | None, message: str) -> None:
        self.errors.append(f"{self.loc.at(self.table, key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        if key not in self.data:
            if required:
                self.error(None, f"missing key '{key}'")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            self.error(key, f"expected a number, got {value!r}")
            return default
        if not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.error(key, f"expected {expected}, got {type(value).__name__}")
            return default
        return value

    def number(self, key: str, default: float, minimum: float = 0) -> float:
        value = self.get(key, (int, float), default)
        if value < minimum:
            self.error(key, f"must be at least {minimum}")
            return default
        return float(value)

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.get(key, int, default)
        if value < minimum:
            self.error(key, f"must be at least {minimum}")
            return default
        return int(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return str(value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.get(key, list, [])
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            self.error(key, "expected a list of names or ids")
            return ()
        return tuple(str(v) for v in value)


def _parse(path: Path, errors: list[str]) -> tuple[dict[str, Any], _Locator] | None:
    try:
        text = path.read_text()
    except OSError as exc:
        errors.append(f"{path}:0: cannot read: {exc.strerror}")
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        errors.append(f"{path}:{m.group(1) if m else 0}: TOML syntax: {exc}")
        return None
    return data, _Locator(path, text)


def _group(path: Path, errors: list[str]) -> GroupConfig | None:
    parsed = _parse(path, errors)
    if parsed is None:
        return None
    data, loc = parsed
    top = _Reader(loc, "", data, errors, {
        "label", "policy", "write_policy", "call_timeout", "hold_timeout", "replay_limit",
        "object_cache_ttl", "direct_calls", "standby_logins", "recovery", "health",
        "allow_users", "allow_groups", "rv_class", "member", "replicate_with"})
    label = top.get("label", str, "", required=True)
    if label and len(label.encode()) > 32:
        top.error("label", "a token label has at most 32 bytes")
    rec = data.get("recovery", {})
    recovery = Recovery()
    if isinstance(rec, dict):
        rr = _Reader(loc, "recovery", rec, errors, {"interval", "attempts", "max_interval"})
        recovery = Recovery(rr.number("interval", 5.0, 0.01), rr.integer("attempts", 0),
                            rr.number("max_interval", 300.0, 0.01))
        if recovery.max_interval < recovery.interval:
            rr.error("max_interval", "must be at least [recovery] interval")
    else:
        top.error("recovery", "expected a table")
    raw_health = data.get("health", {})
    health = Health()
    if isinstance(raw_health, dict):
        hr = _Reader(loc, "health", raw_health, errors, {"interval", "probe", "probe_key"})
        health = Health(hr.number("interval", 10.0, 0), hr.choice("probe", PROBES, "token-info"),
                        hr.get("probe_key", str))
        if health.probe == "sign" and not health.probe_key:
            hr.error("probe_key", 'probe = "sign" needs probe_key (the label of the key)')
        elif health.probe != "sign" and health.probe_key is not None:
            hr.error("probe_key", 'only with probe = "sign"')
    else:
        top.error("health", "expected a table")
    rv_classes: dict[int, str] = {}
    raw_classes = top.get("rv_class", dict, {})
    for name, cls in raw_classes.items():
        if name not in CKR:
            errors.append(f"{loc.at('rv_class', name)}: unknown return code")
        elif cls not in RV_CLASSES:
            errors.append(f"{loc.at('rv_class', name)}: class must be one of {', '.join(RV_CLASSES)}")
        else:
            rv_classes[CKR[name]] = cls
    members: list[MemberConfig] = []
    raw_members = data.get("member", [])
    if not isinstance(raw_members, list) or not raw_members:
        top.error(None, "at least one [[member]] is required")
        raw_members = []
    names: set[str] = set()
    for index, raw in enumerate(raw_members):
        mr = _Reader(loc, f"member[{index}]", raw, errors,
                     {"name", "module", "token", "serial", "uri", "env", "weight"})
        name = mr.get("name", str, f"member{index}", required=True)
        if name in names:
            mr.error("name", f"duplicate member name {name!r}")
        names.add(name)
        module = mr.get("module", str, "", required=True)
        if module and not os.path.isabs(module):
            mr.error("module", "must be an absolute path")
        elif module and not os.path.exists(module):
            mr.error("module", f"no such file: {module}")
        token = mr.get("token", str)
        serial = mr.get("serial", str)
        uri = mr.get("uri", str)
        selected: dict[str, str] = {}
        if uri is not None:
            if token is not None or serial is not None:
                mr.error("uri", "give either 'uri' or 'token'/'serial', not both")
            try:
                selected = parse_uri(uri)
            except URIError as exc:
                mr.error("uri", str(exc))
            token, serial = selected.get("token"), selected.get("serial")
        elif token is None and serial is None:
            mr.error(None, "needs 'token' (label), 'serial' or 'uri'")
        env = mr.get("env", dict, {})
        if not all(isinstance(v, str) for v in env.values()):
            mr.error("env", "values must be strings")
            env = {}
        slot = selected.get("slot-id")
        members.append(MemberConfig(name, module, token, serial, dict(env),
                                    mr.integer("weight", 1, 1), selected.get("manufacturer"),
                                    selected.get("model"), int(slot) if slot else None))
    write_policy = top.choice("write_policy", WRITE_POLICIES, "primary")
    replicate_with = top.get("replicate_with", str)
    if replicate_with is not None and write_policy != "all":
        top.error("replicate_with", 'only with write_policy = "all"')
    return GroupConfig(
        label=label, file=path, members=tuple(members),
        policy=top.choice("policy", POLICIES, "failover"),
        write_policy=write_policy,
        replicate_with=replicate_with,
        call_timeout=top.number("call_timeout", 30.0, 0.01),
        hold_timeout=top.number("hold_timeout", 10.0, 0),
        replay_limit=top.integer("replay_limit", 1 << 20),
        object_cache_ttl=top.number("object_cache_ttl", 5.0),
        direct_calls=top.get("direct_calls", bool, True),
        standby_logins=top.get("standby_logins", bool, True),
        recovery=recovery,
        health=health,
        allow_users=top.strings("allow_users"),
        allow_groups=top.strings("allow_groups"),
        rv_classes=rv_classes,
    )


def _sockets(base: Path, socket: str, admin: str | None) -> tuple[Path, Path]:
    """The client and admin socket paths (relative ones from the main file's folder)."""
    client = base / socket
    return client, (base / admin if admin else client.with_name(client.name + ".admin"))


def _state_dir(d: _Reader, base: Path) -> Path | None:
    text = d.get("state_dir", str)
    if not isinstance(text, str):
        return None
    if not text:
        d.error("state_dir", "must name a directory")
        return None
    return base / text


def admin_socket_of(path: Path) -> Path:
    """The admin socket a main file names (without reading the token files)."""
    path = path.resolve()
    errors: list[str] = []
    parsed = _parse(path, errors)
    if parsed is None:
        raise ConfigError(errors)
    daemon = parsed[0].get("daemon", {})
    admin = daemon.get("admin_socket")
    return _sockets(path.parent, str(daemon.get("socket", DEFAULT_SOCKET)),
                    str(admin) if admin else None)[1]


def _audit_log(d: _Reader, base: Path) -> str | None:
    """[daemon] audit_log: "journal", or a file (relative to the main file's folder)
    that the daemon can create or append to."""
    value: str | None = d.get("audit_log", str)
    if value is None or value == "journal":
        return value
    if not value:
        d.error("audit_log", 'expected a file path or "journal"')
        return None
    path = base / value
    if path.exists():
        problem = None if path.is_file() else "not a regular file"
        if problem is None and not os.access(path, os.W_OK):
            problem = "not writable"
    elif not path.parent.is_dir():
        problem = f"no such directory: {path.parent}"
    else:
        problem = None if os.access(path.parent, os.W_OK | os.X_OK) else \
            f"cannot create a file in {path.parent}"
    if problem is not None:
        d.error("audit_log", f"{path}: {problem}")
        return None
    return str(path)


def load(path: Path) -> DaemonConfig:
    """Reads and validates the main file and every token file; raises ConfigError."""
    path = path.resolve()
    errors: list[str] = []
    parsed = _parse(path, errors)
    if parsed is None:
        raise ConfigError(errors)
    data, loc = parsed
    _Reader(loc, "", data, errors, {"daemon"})
    raw = data.get("daemon", {})
    d = _Reader(loc, "daemon", raw if isinstance(raw, dict) else {}, errors, {
        "socket", "admin_socket", "tokens_dir", "log_level", "max_frame", "helper_pool",
        "fork_server", "context_grace", "adopt_timeout", "state_dir", "socket_group", "socket_mode", "max_sessions_per_app",
        "max_apps_per_uid", "max_calls_per_app", "max_helpers", "audit_log", "audit_interval"})
    base = path.parent
    socket, admin_socket = _sockets(base, d.get("socket", str, DEFAULT_SOCKET),
                                    d.get("admin_socket", str))
    tokens_dir = base / d.get("tokens_dir", str, "tokens.d")
    groups: list[GroupConfig] = []
    if not tokens_dir.is_dir():
        d.error("tokens_dir", f"not a directory: {tokens_dir}")
    else:
        labels: dict[str, Path] = {}
        for file in sorted(tokens_dir.glob("*.toml")):
            group = _group(file, errors)
            if group is None:
                continue
            if group.label in labels:
                errors.append(f"{file}:1: label: {group.label!r} is already used by {labels[group.label]}")
            labels[group.label] = file
            groups.append(group)
        if not groups and not errors:
            d.error("tokens_dir", f"no *.toml token files in {tokens_dir}")
    group = d.get("socket_group", (str, int))
    if group is not None:
        try:
            grp.getgrgid(group) if isinstance(group, int) else grp.getgrnam(group)
        except KeyError:
            d.error("socket_group", f"no such group: {group}")
            group = None
    mode_text = d.get("socket_mode", str, "0660")
    try:
        mode = int(mode_text, 8)
        if mode & ~0o777 or mode & 0o007:
            raise ValueError
    except ValueError:
        d.error("socket_mode", f"expected an octal mode without access for others, got {mode_text!r}")
        mode = 0o660
    config = DaemonConfig(
        file=path, socket=socket, socket_group=None if group is None else str(group),
        socket_mode=mode, admin_socket=admin_socket,
        tokens_dir=tokens_dir,
        log_level=d.choice("log_level", ("debug", "info", "warning", "error"), "info"),
        max_frame=d.integer("max_frame", 16 * 1024 * 1024, 4096),
        helper_pool=d.integer("helper_pool", 1, 0),
        fork_server=d.get("fork_server", bool, True),
        context_grace=d.number("context_grace", 5.0),
        adopt_timeout=d.number("adopt_timeout", 30.0, 0),
        state_dir=_state_dir(d, base),
        max_sessions_per_app=d.integer("max_sessions_per_app", 1024, 1),
        max_apps_per_uid=d.integer("max_apps_per_uid", 64, 1),
        max_calls_per_app=d.integer("max_calls_per_app", 64, 1),
        max_helpers=d.integer("max_helpers", 512, 1),
        audit_log=_audit_log(d, base),
        audit_interval=d.number("audit_interval", 60.0, 0.1),
        groups=tuple(groups),
    )
    if errors:
        raise ConfigError(errors)
    return config
