"""`p11p doctor`: what stands between an application and its tokens, checked in order.

The configuration, the socket applications use (as the client library picks it:
`P11P_SOCKET`, else the configuration's, else the default), the daemon's answer on its
admin socket, every group and member, and a test operation through the client library
itself. One line per check: `OK   what`, `WARN what: problem — fix` (applications still
work), `FAIL what: problem — fix`. A failure that blocks applications ends the run (the
checks after it are listed as skipped) with a non-zero exit. A PIN given with `--pin` goes
to C_Login only: never printed, never logged.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import socket
import stat
import struct
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, TextIO

from p11p.daemon.admin import exchange
from p11p.daemon.config import DEFAULT_CONFIG, DEFAULT_SOCKET, ConfigError, DaemonConfig, load
from p11p.protocol.constants import CKR, rv_name

STAGES = ("configuration", "socket", "daemon", "groups and members", "test operation")
SUN_PATH_MAX = 108  # sockaddr_un.sun_path, with its terminating NUL
ADMIN_TIMEOUT = 10.0
CLIENT_TIMEOUT_MS = "30000"  # the test operation's calls, when P11P_TIMEOUT_MS is unset


class Blocked(Exception):
    """A failure that blocks applications: the checks after it are skipped."""


class Report:
    """The lines of one run and whether any check failed."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = False

    def ok(self, what: str) -> None:
        print(f"OK   {what}", file=self.out, flush=True)

    def warn(self, what: str, problem: str, fix: str) -> None:
        print(f"WARN {what}: {problem} — {fix}", file=self.out, flush=True)

    def fail(self, what: str, problem: str, fix: str) -> None:
        self.failed = True
        print(f"FAIL {what}: {problem} — {fix}", file=self.out, flush=True)

    def block(self, what: str, problem: str, fix: str) -> Blocked:
        self.fail(what, problem, fix)
        return Blocked(what)

    def skipped(self, stages: tuple[str, ...]) -> None:
        for stage in stages:
            print(f"SKIP {stage}: not checked after the failure above", file=self.out, flush=True)


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _process(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# ---- the configuration ----------------------------------------------------------------

def config_path(given: str | None) -> Path | None:
    """--config, else /etc/p11p/p11p.toml, else the built-in default when it was made."""
    if given:
        return Path(given)
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    from p11p.daemon.defaults import state_dir
    made = state_dir() / "p11p.toml"
    return made if made.exists() else None


def check_config(r: Report, given: str | None) -> DaemonConfig | None:
    path = config_path(given)
    if path is None:
        r.warn("configuration", f"none given and no {DEFAULT_CONFIG}",
               "give --config FILE to check the daemon's configuration too")
        return None
    try:
        config = load(path)
    except ConfigError as exc:
        for error in exc.errors:
            r.fail("configuration", error, f"fix it (p11p check-config {path})")
        raise Blocked("configuration") from None
    labels = ", ".join(g.label for g in config.groups)
    r.ok(f"configuration {config.file} ({len(config.groups)} groups: {labels})")
    return config


# ---- the socket -----------------------------------------------------------------------

def client_socket(config: DaemonConfig | None) -> tuple[str, str]:
    """The socket an application would use, as client/state.c picks it, and why."""
    env = os.environ.get("P11P_SOCKET", "")
    if env:
        return env, "from P11P_SOCKET"
    if config is not None:
        return str(config.socket), f"from {config.file}"
    return DEFAULT_SOCKET, "the default"


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    """pid, uid, gid of the process that listens (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def check_socket(r: Report, path: str, origin: str, config: DaemonConfig | None) -> None:
    what = f"socket {path}"
    start = ("start the daemon (systemctl start p11p.socket p11p.service, "
             "or p11p daemon --config FILE)")
    if config is not None and os.environ.get("P11P_SOCKET") and path != str(config.socket):
        r.warn(what, f"P11P_SOCKET names it, but {config.file} has the daemon listen at "
               f"{config.socket}", "make them agree (or unset P11P_SOCKET)")
    if len(path.encode()) >= SUN_PATH_MAX:
        raise r.block(what, f"longer than {SUN_PATH_MAX - 1} bytes: no socket can have it",
                      "choose a shorter path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        fix = start + ("; or correct P11P_SOCKET" if "P11P_SOCKET" in origin else "")
        raise r.block(what, f"no such file ({origin})", fix) from None
    except OSError as exc:
        raise r.block(what, f"cannot look at it: {exc.strerror} (its directory is closed "
                      "to this user)", "add this user to the socket's group "
                      "(socket_group in the configuration, p11p with the packaged units)") from None
    r.ok(f"{what} exists ({origin})")
    if not stat.S_ISSOCK(st.st_mode):
        raise r.block(what, f"not a socket (mode {stat.filemode(st.st_mode)})",
                      f"remove it, then {start}")
    owner = f"owner {_user(st.st_uid)}, group {_group(st.st_gid)}, mode {st.st_mode & 0o777:04o}"
    r.ok(f"{what} is a socket ({owner})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(path)
        except OSError as exc:
            me = _user(os.geteuid())
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise r.block(what, f"{me} may not connect ({owner})",
                              f"add this user to group {_group(st.st_gid)} (socket_group), "
                              "then log in again") from None
            if exc.errno == errno.ECONNREFUSED:
                raise r.block(what, "nobody listens (a socket file left by a daemon that "
                              "stopped)", start) from None
            raise r.block(what, f"connect: {exc.strerror or exc}", start) from None
        pid, uid, _ = _peer(sock)
    r.ok(f"{what} reachable by {_user(os.geteuid())}")
    listener = f"pid {pid} ({_process(pid)})"
    if uid == st.st_uid:
        r.ok(f"{what} owned by the daemon's user, {_user(uid)}: listener {listener}")
    else:
        r.warn(what, f"owned by {_user(st.st_uid)}, but the process listening on it, "
               f"{listener}, runs as {_user(uid)}", "check that the daemon (and nothing "
               "else) made it: stop whatever listens there and start p11p")


# ---- the daemon -----------------------------------------------------------------------

def admin_socket(path: str, config: DaemonConfig | None, given: str | None) -> Path:
    if given:
        return Path(given)
    if config is not None and str(config.socket) == path:
        return config.admin_socket
    return Path(path + ".admin")


def ask_admin(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request on the admin socket; OSError or ValueError when it does not work."""
    return exchange(path, request, ADMIN_TIMEOUT)


def check_daemon(r: Report, admin: Path, config: DaemonConfig | None) -> dict[str, Any] | None:
    what = f"daemon (admin socket {admin})"
    # a socket-activated daemon starts with the first connection: give it time to listen
    deadline = time.monotonic() + ADMIN_TIMEOUT
    while True:
        try:
            status = ask_admin(admin, {"cmd": "status"})
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            r.warn(what, f"cannot ask it: {exc.strerror}", "check admin_socket in the "
                   "configuration (or give --admin-socket); the test operation still runs")
            return None
        except PermissionError as exc:
            r.warn(what, f"cannot ask it: {exc.strerror}", "run p11p doctor as root (or the "
                   "daemon's user) to check groups and members; the test operation still runs")
            return None
        except TimeoutError:
            raise r.block(what, f"no answer in {ADMIN_TIMEOUT:.0f} s", "look at the daemon's "
                          "log (journalctl -u p11p); restart it if it hangs") from None
        except (OSError, ValueError) as exc:
            raise r.block(what, f"no valid answer: {exc}", "look at the daemon's log "
                          "(journalctl -u p11p)") from None
    groups = [g["label"] for g in status.get("groups", [])]
    r.ok(f"{what} answers: {len(groups)} groups, {len(status.get('contexts', []))} "
         "applications connected")
    if config is not None:
        configured = {g.label for g in config.groups}
        if configured != set(groups):
            r.warn(what, f"serves groups {sorted(groups)}, the configuration has "
                   f"{sorted(configured)}", "p11p reload (or restart the daemon)")
    return status


def check_groups(r: Report, status: dict[str, Any]) -> None:
    out_of_service = False
    for g in status["groups"]:
        what = f"group {g['label']}"
        serving = [m for m in g["members"] if m["state"] == "OK"]
        for m in g["members"]:
            check_member(r, g["label"], m, serving != [])
        if serving:
            r.ok(f"{what} (slot {g['slot']}, {g['policy']}): {len(serving)} of "
                 f"{len(g['members'])} members in service")
        else:
            out_of_service = True
            r.fail(what, "no member in service: its applications get CKR_DEVICE_ERROR",
                   "bring a member back (see its line above; p11p status shows recovery)")
    if out_of_service:
        raise Blocked("groups and members")


def check_member(r: Report, group: str, m: dict[str, Any], others: bool) -> None:
    what = f"group {group} member {m['name']}"
    state = m["state"]
    found = f"token found in slot {m['slot']}" if m.get("slot") is not None else "token not found"
    if state == "OK":
        probe = m.get("probe")
        if probe and not probe["ok"]:
            r.warn(what, f"in service, {found}, but its last probe failed: {probe['error']}",
                   "check the token and its module")
            return
        latency = f", probe {probe['latency_ms']} ms" if probe else ""
        r.ok(f"{what}: in service, {found}{latency}")
        return
    if state in ("DRAINING", "DISABLED"):
        r.warn(what, f"{state.lower()} by an operator",
               f"p11p member enable {group} {m['name']} when its work is done")
        return
    detail = " ".join(x for x in (state, m.get("last_rv") or "", m.get("last_error") or "") if x)
    if state == "RECOVERING":
        detail += f" (attempt {m.get('attempt')}/{m.get('attempts') or '∞'})"
    fix = ("check the token, its module and env in tokens.d (p11p status shows "
           "recovery; it returns by itself once the token answers)")
    if others:
        r.warn(what, f"{detail}, {found}", fix)
    else:
        r.fail(what, f"{detail}, {found}", fix)


# ---- the test operation, through the client library -----------------------------------

_ULONG = ctypes.c_ulong


class TokenInfo(ctypes.Structure):
    """CK_TOKEN_INFO (Cryptoki's own layout: no packing on Unix)."""

    _fields_ = [
        ("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16),
        ("flags", _ULONG), ("ulMaxSessionCount", _ULONG), ("ulSessionCount", _ULONG),
        ("ulMaxRwSessionCount", _ULONG), ("ulRwSessionCount", _ULONG),
        ("ulMaxPinLen", _ULONG), ("ulMinPinLen", _ULONG), ("ulTotalPublicMemory", _ULONG),
        ("ulFreePublicMemory", _ULONG), ("ulTotalPrivateMemory", _ULONG),
        ("ulFreePrivateMemory", _ULONG), ("hardwareVersion", ctypes.c_ubyte * 2),
        ("firmwareVersion", ctypes.c_ubyte * 2), ("utcTime", ctypes.c_char * 16)]


CKF_SERIAL_SESSION = 0x4
CKU_USER = 1
NOT_SUPPORTED = (CKR["CKR_FUNCTION_NOT_SUPPORTED"], CKR["CKR_RANDOM_NO_RNG"])


def client_library(given: str | None) -> Path | None:
    """--module, else the build beside this package, the p11-kit module file, the
    installed library."""
    if given:
        return Path(given)
    candidates = [Path(__file__).resolve().parents[1] / "build" / "p11p-client.so"]
    for module_file in (Path("/etc/pkcs11/modules/p11p.module"),
                        Path("/usr/share/p11-kit/modules/p11p.module")):
        try:
            for line in module_file.read_text().splitlines():
                if line.startswith("module:"):
                    candidates.append(Path(line.split(":", 1)[1].strip()))
        except OSError:
            continue
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for prefix in ("/usr/local/lib", "/usr/lib"):
        candidates.append(Path(prefix) / multiarch / "p11p" / "p11p-client.so")
    return next((c for c in candidates if c.is_file()), None)


class Client:
    """The calls the test operation needs, straight from p11p-client.so's exports."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))

    def call(self, name: str, *args: Any) -> int:
        function: Any = getattr(self.lib, name)
        function.restype = ctypes.c_ulong
        return int(function(*args))


def _fix_for(rv: int) -> str:
    if rv == CKR["CKR_DEVICE_ERROR"]:
        return "look at the daemon's log (journalctl -u p11p) and p11p status"
    return "look at the daemon's log (journalctl -u p11p)"


def check_operation(r: Report, path: str, module: str | None, pin: str | None,
                    status: dict[str, Any] | None) -> None:
    library = client_library(module)
    if library is None or not library.is_file():
        r.warn("test operation", f"no client library found ({module or 'p11p-client.so'})",
               "give --module PATH/p11p-client.so")
        return
    os.environ["P11P_SOCKET"] = path  # read by the library at C_Initialize
    os.environ.setdefault("P11P_TIMEOUT_MS", CLIENT_TIMEOUT_MS)
    try:
        client = Client(library)
    except OSError as exc:
        raise r.block("test operation", f"cannot load {library}: {exc}",
                      "rebuild or reinstall it (make build, make install)") from None
    rv = client.call("C_Initialize", None)
    if rv != CKR["CKR_OK"]:
        raise r.block("test operation", f"C_Initialize: {rv_name(rv)}", f"check {library}")
    try:
        labels = _slots(r, client, library)
        for slot, label in labels.items():
            _operate(r, client, slot, label, pin)
        if status is not None:
            for g in status["groups"]:
                if g["label"] not in labels.values():
                    r.warn(f"group {g['label']}", "not visible to this user",
                           "allow_users/allow_groups in its token file, if it should be")
    finally:
        client.call("C_Finalize", None)


def _slots(r: Report, client: Client, library: Path) -> dict[int, str]:
    count = ctypes.c_ulong(0)
    rv = client.call("C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(count))
    slots = (ctypes.c_ulong * max(count.value, 1))()
    if rv == CKR["CKR_OK"]:
        rv = client.call("C_GetSlotList", ctypes.c_ubyte(1), slots, ctypes.byref(count))
    if rv != CKR["CKR_OK"]:
        raise r.block(f"test operation through {library}", f"C_GetSlotList: {rv_name(rv)}",
                      _fix_for(rv))
    if count.value == 0:
        raise r.block(f"test operation through {library}", "no token: the daemon lets "
                      f"{_user(os.geteuid())} see none (or cannot be reached)",
                      "allow this user in a group (allow_users/allow_groups in tokens.d)")
    labels: dict[int, str] = {}
    for slot in slots[:count.value]:
        info = TokenInfo()
        rv = client.call("C_GetTokenInfo", ctypes.c_ulong(slot), ctypes.byref(info))
        if rv != CKR["CKR_OK"]:
            r.fail(f"slot {slot}", f"C_GetTokenInfo: {rv_name(rv)}", _fix_for(rv))
            continue
        labels[slot] = info.label.decode(errors="replace").rstrip(" \0")
    r.ok(f"client library {library}: {len(labels)} tokens "
         f"({', '.join(labels.values())})")
    return labels


def _operate(r: Report, client: Client, slot: int, label: str, pin: str | None) -> None:
    what = f"test operation on {label} (slot {slot})"
    session = ctypes.c_ulong(0)
    began = time.monotonic()
    rv = client.call("C_OpenSession", ctypes.c_ulong(slot), ctypes.c_ulong(CKF_SERIAL_SESSION),
                     None, None, ctypes.byref(session))
    if rv != CKR["CKR_OK"]:
        r.fail(what, f"C_OpenSession: {rv_name(rv)}", _fix_for(rv))
        return
    try:
        data = (ctypes.c_ubyte * 16)()
        rv = client.call("C_GenerateRandom", session, data, ctypes.c_ulong(16))
        done = ""
        if rv == CKR["CKR_OK"]:
            done = "C_OpenSession, C_GenerateRandom"
        elif rv in NOT_SUPPORTED:
            rv, found = _find(client, session)
            done = f"C_OpenSession, a search ({found} public objects)"
        if rv != CKR["CKR_OK"]:
            r.fail(what, f"{rv_name(rv)}", _fix_for(rv))
            return
        r.ok(f"{what}: {done} in {(time.monotonic() - began) * 1000:.0f} ms")
        if pin is not None:
            _login(r, client, session, label, pin)
    finally:
        client.call("C_CloseSession", session)


def _find(client: Client, session: ctypes.c_ulong) -> tuple[int, int]:
    rv = client.call("C_FindObjectsInit", session, None, ctypes.c_ulong(0))
    if rv != CKR["CKR_OK"]:
        return rv, 0
    handles = (ctypes.c_ulong * 64)()
    count = ctypes.c_ulong(0)
    rv = client.call("C_FindObjects", session, handles, ctypes.c_ulong(64), ctypes.byref(count))
    final = client.call("C_FindObjectsFinal", session)
    return (rv if rv != CKR["CKR_OK"] else final), count.value


def _login(r: Report, client: Client, session: ctypes.c_ulong, label: str, pin: str) -> None:
    what = f"login on {label} (PIN from --pin)"
    secret = ctypes.create_string_buffer(pin.encode(), len(pin.encode()))
    try:
        rv = client.call("C_Login", session, ctypes.c_ulong(CKU_USER), secret,
                         ctypes.c_ulong(len(secret)))
    finally:
        ctypes.memset(secret, 0, len(secret))
    if rv not in (CKR["CKR_OK"], CKR["CKR_USER_ALREADY_LOGGED_IN"]):
        fix = ("check the PIN (never shown here)" if rv in (CKR["CKR_PIN_INCORRECT"],
               CKR["CKR_PIN_LEN_RANGE"]) else _fix_for(rv))
        r.fail(what, rv_name(rv), fix)
        return
    rv, found = _find(client, session)
    client.call("C_Logout", session)
    if rv != CKR["CKR_OK"]:
        r.fail(what, f"logged in, then a search: {rv_name(rv)}", _fix_for(rv))
        return
    r.ok(f"{what}: {found}{'+' if found == 64 else ''} objects visible")


# ---- the run --------------------------------------------------------------------------

def run(config: str | None = None, pin: str | None = None, module: str | None = None,
        admin: str | None = None, out: TextIO = sys.stdout) -> int:
    """All the checks, in order; 0 when nothing failed."""
    r = Report(out)
    done = 0
    try:
        daemon_config = check_config(r, config)
        done = 1
        path, origin = client_socket(daemon_config)
        check_socket(r, path, origin, daemon_config)
        done = 2
        status = check_daemon(r, admin_socket(path, daemon_config, admin), daemon_config)
        done = 3
        if status is not None:
            check_groups(r, status)
        done = 4
        check_operation(r, path, module, pin, status)
        done = 5
    except Blocked:
        r.skipped(STAGES[done + 1:])
        return 1
    return 1 if r.failed else 0
