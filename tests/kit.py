"""Test kit: real SoftHSM2 tokens and a real p11p daemon, started and stopped by PID.

Everything a test needs to stand up the proxy: a SoftHSM2 configuration in a temporary
directory with initialised tokens, a p11p configuration naming them, and the daemon as a
child process. Nothing here mocks PKCS#11.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
CLIENT_SO = BUILD / "p11p-client.so"
ASAN_CLIENT_SO = BUILD / "asan" / "p11p-client.so"
FAULTSIM_SO = BUILD / "p11p-faultsim.so"
SOFTHSM_SO = Path("/usr/lib/softhsm/libsofthsm2.so")
USER_PIN = "1234"
SO_PIN = "5678"


def shows_pin(text: str, pin: str = USER_PIN) -> bool:
    """Whether `text` shows `pin` as a value of its own. The short test PIN is also part of
    the random slot ids and the pids a log prints, so a plain substring test would fail
    on a log that leaks nothing; and a process may have that very pid (`pid=1234`, met
    in make test), or a slot that id."""
    return re.search(rf"(?<![0-9A-Za-z])(?<!pid=)(?<!pid )(?<!slot=){re.escape(pin)}"
                     rf"(?![0-9A-Za-z])", text) is not None


class SoftHSM:
    """A SoftHSM2 configuration and its tokens, all under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = root / "tokens"
        self.tokens.mkdir(parents=True, exist_ok=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n")
        self.env = {"SOFTHSM2_CONF": str(self.conf)}

    def init_token(self, label: str, pin: str = USER_PIN, so_pin: str = SO_PIN) -> None:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--pin", pin, "--so-pin", so_pin],
                       env={**os.environ, **self.env}, check=True, capture_output=True)

    def apply_env(self) -> None:
        os.environ.update(self.env)


class Daemon:
    """A p11p daemon run as a child process with a configuration written for it."""

    def __init__(self, root: Path, groups: dict[str, str], daemon_extra: str = "") -> None:
        """`groups`: file stem -> body of that token file."""
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "run" / "p11p.sock"
        self.config = root / "p11p.toml"
        tokens = root / "tokens.d"
        tokens.mkdir(exist_ok=True)
        for stem, body in groups.items():
            (tokens / f"{stem}.toml").write_text(textwrap.dedent(body))
        self.config.write_text(
            f'[daemon]\nsocket = "run/p11p.sock"\ntokens_dir = "tokens.d"\n{daemon_extra}')
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # helpers seen, across restarts: they outlive a daemon (adopt_timeout) and are
        # not the next one's children; stop() ends them
        self.helpers: set[int] = set()

    @property
    def env(self) -> dict[str, str]:
        return {"P11P_SOCKET": str(self.socket)}

    def start(self, timeout: float = 30.0, log_level: str = "debug", preamble: str = "") -> Daemon:
        """`preamble`: Python run in the daemon's process before it starts (a test that
        makes the daemon pretend something, e.g. another range of protocol versions)."""
        if self.socket.exists():
            self.socket.unlink()
        python = ["-m", "p11p.daemon"]
        if preamble:
            python = ["-c", f"{preamble}\nimport runpy\n"
                      "runpy.run_module('p11p.daemon', run_name='__main__', alter_sys=True)"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *python, "daemon", "--config", str(self.config),
                 "--log-level", log_level],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            if self.socket.exists() and "listening on" in self.log_text():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daemon did not start:\n{self.log_text()}")

    def note_helpers(self) -> None:
        if self.proc is not None:
            self.helpers.update(helper_pids(self.proc.pid))

    def restart(self, sig: int = signal.SIGTERM, timeout: float = 15.0,
                preamble: str = "") -> float:
        """Ends the daemon with `sig` and starts it again on the same configuration (its
        applications' helpers wait for it); `preamble` as for start(); the seconds it
        took."""
        assert self.proc is not None
        began = time.monotonic()
        self.note_helpers()
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        self.proc = None
        self.start(preamble=preamble)
        return time.monotonic() - began

    def stop(self, timeout: float = 15.0) -> int | None:
        self.note_helpers()
        proc, self.proc = self.proc, None
        if proc is None:
            self._end_helpers()
            return None
        if proc.poll() is None:
            # for good (SIGINT): the applications' helpers end with it, as the test's
            # applications do; SIGTERM would leave them waiting for a next daemon
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # helpers run in their own sessions; make sure none is left behind
        self.helpers.update(helper_pids(proc.pid))
        self._end_helpers()
        return proc.returncode

    def _end_helpers(self) -> None:
        for pid in self.helpers:
            if b"p11p.helper" in _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.helpers.clear()

    def kill(self) -> None:
        """SIGKILL, as a crash would (the helpers notice EOF: they wait for a restarted
        daemon up to adopt_timeout, then exit; stop() ends them)."""
        self.note_helpers()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def zombies(pid: int) -> list[int]:
    """Children of `pid` (and of its fork servers) that exited and were not reaped (a
    helper killed, forgotten)."""
    dead = []
    for child in children(pid) + [c for s in fork_server_pids(pid) for c in children(s)]:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            dead.append(child)
    return dead


def fork_server_pids(daemon_pid: int) -> list[int]:
    """The daemon's fork servers (daemon/forkserver.py), one per member."""
    return [pid for pid in children(daemon_pid) if b"p11p.helper.forkserver" in _cmdline(pid)]


def helper_pids(daemon_pid: int) -> list[int]:
    """The daemon's helpers: its children (started as processes of their own) and its
    fork servers' children."""
    pids = []
    for pid in children(daemon_pid):
        cmd = _cmdline(pid)
        if b"p11p.helper.forkserver" in cmd:
            pids.extend(children(pid))
        elif b"p11p.helper" in cmd:
            pids.append(pid)
    return pids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def libasan() -> str:
    return subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                          text=True, check=True).stdout.strip()


def sanitized() -> dict[str, str]:
    """The environment that runs an application on the ASan/UBSan build of the client."""
    return {"LD_PRELOAD": libasan(), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}


SANITIZED_CACHE = BUILD / "asan" / "cache"
SANITIZER_MARKS = ("AddressSanitizer", "runtime error:", "LeakSanitizer")


def sanitized_helper(logs: Path | None = None) -> dict[str, str]:
    """The environment of a helper (a member's `env`, or a helper the test starts) that
    runs on the extension's ASan/UBSan twin (helper/ffi.py, P11P_HELPER_SANITIZE), built
    into SANITIZED_CACHE now when it is not there. `logs`: the sanitizers write their
    reports under it (asan.PID, ubsan.PID) rather than to the helper's stderr."""
    from p11p.helper import build_cffi, ffi

    key = ffi.expected_key()
    assert key is not None, "no Cryptoki headers"
    place = SANITIZED_CACHE / ffi.sanitized_dir(key).name
    if not (place / build_cffi.extension_filename()).exists():
        subprocess.run([sys.executable, build_cffi.__file__, "--sanitize", str(place)],
                       check=True, capture_output=True, timeout=600)
    asan, ubsan = "detect_leaks=0:exitcode=99", "halt_on_error=1:print_stacktrace=1"
    if logs is not None:
        asan += f":log_path={logs / 'asan'}"
        ubsan += f":log_path={logs / 'ubsan'}"
    return {"LD_PRELOAD": libasan(), "P11P_HELPER_SANITIZE": "1",
            "P11P_CACHE_DIR": str(SANITIZED_CACHE), "ASAN_OPTIONS": asan,
            "UBSAN_OPTIONS": ubsan}


def sanitizer_reports(logs: Path) -> list[str]:
    """The reports the sanitizers wrote under `logs` (sanitized_helper)."""
    return [p.read_text(errors="replace") for p in sorted(logs.glob("*san.*"))]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def one_member_group(label: str, softhsm: SoftHSM, token: str, extra: str = "") -> str:
    return f"""
        label = "{label}"
        policy = "failover"
        {extra}
        [[member]]
        name = "softhsm-{token}"
        module = "{SOFTHSM_SO}"
        token = "{token}"
        env = {{ SOFTHSM2_CONF = "{softhsm.conf}" }}
        """


class Target:
    """One way to reach the token: SoftHSM2 directly or through p11p."""

    def __init__(self, name: str, lib, slot: int, module: Path) -> None:  # type: ignore[no-untyped-def]
        self.name, self.lib, self.slot, self.module = name, lib, slot, module

    def session(self, login: bool = True):  # type: ignore[no-untyped-def]
        import PyKCS11
        s = self.lib.openSession(self.slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
        if login:
            try:
                s.login(USER_PIN)
            except PyKCS11.PyKCS11Error as exc:
                if exc.value != PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
                    raise
        return s


# -- a TLS server whose key is on a token, through OpenSSL's pkcs11 engine ---------------

OPENSSL_ENGINE_CNF = """
openssl_conf = init
[init]
engines = engines
[engines]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = /usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so
MODULE_PATH = {client}
init = 0
[req]
distinguished_name = dn
[dn]
"""


class TlsServer:
    """`openssl s_server` with `key` (a pkcs11: URI) through the pkcs11 engine on
    p11p-client.so, and a client thread doing handshakes in a loop, each verified
    against `cert`: `results` holds (ok, seconds, why) per handshake."""

    def __init__(self, key: str, cert: Path, conf: Path, env: dict[str, str]) -> None:
        import socket
        import ssl
        import threading
        conf.write_text(OPENSSL_ENGINE_CNF.format(client=CLIENT_SO))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc = subprocess.Popen(
            ["openssl", "s_server", "-engine", "pkcs11", "-keyform", "engine", "-key", key,
             "-cert", str(cert), "-accept", f"127.0.0.1:{self.port}", "-www", "-quiet"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, **env, "OPENSSL_CONF": str(conf)})
        self.ctx = ssl.create_default_context(cafile=str(cert))
        self.ctx.check_hostname = False
        self.results: list[tuple[bool, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._handshakes)

    def _connects(self) -> bool:
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def start(self) -> None:
        if not wait_for(self._connects, 20):
            raise RuntimeError(self.proc.stderr.read().decode() if self.proc.stderr else "")
        self._thread.start()

    def _handshakes(self) -> None:
        import socket
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                        self.ctx.wrap_socket(raw) as tls:
                    ok, why = tls.getpeercert() is not None, ""
            except OSError as exc:
                ok, why = False, repr(exc)
            self.results.append((ok, time.monotonic() - began, why))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self.proc.kill()
        self.proc.wait()
