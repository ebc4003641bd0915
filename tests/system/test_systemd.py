"""systemd: the units pass `systemd-analyze verify`; the daemon serves a real client
through a socket inherited from `systemd-socket-activate`; READY=1 reaches
$NOTIFY_SOCKET only once the client socket accepts and the members were probed; the
daemon and its helpers run as user p11p, laid out as the units and `make install` do.

No systemd runs here as PID 1: `systemd-analyze verify` and `systemd-socket-activate`
work without it. Every process a test starts is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import (
    CLIENT_SO,
    FAULTSIM_SO,
    ROOT,
    SOFTHSM_SO,
    Daemon,
    SoftHSM,
    one_member_group,
)
from syskit import (
    NotifyListener,
    ServiceUser,
    as_user,
    connects,
    ensure_command,
    in_namespace,
    interpreter_binds,
    make_install,
    process_tree,
    uids_of,
)

pytestmark = pytest.mark.timeout(30, func_only=True)

UNITS = ROOT / "systemd"
UNIT_EXEC = "/usr/local/bin/p11p"  # where p11p.service expects the command


@pytest.fixture(scope="module")
def systemd_tools() -> None:
    ensure_command("systemd-analyze", "systemd")
    ensure_command("systemd-socket-activate", "systemd")
    ensure_command("pkcs11-tool", "opensc")


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    hsm = SoftHSM(tmp_path_factory.mktemp("softhsm-system"))
    hsm.init_token("tokSys")
    return hsm


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Section.Key -> values, in file order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60)


def verifiable_copy(service: Path, socket_unit: Path, into: Path, command: str) -> list[Path]:
    """The two units with ExecStart's command replaced by one that exists here (verify
    checks that it is executable); their names stay p11p.* so that they pair up."""
    into.mkdir(parents=True, exist_ok=True)
    text = service.read_text()
    exec_start = unit_settings(service)["Service.ExecStart"][0].split()[0]
    (into / "p11p.service").write_text(text.replace(f"ExecStart={exec_start} ",
                                                    f"ExecStart={command} "))
    shutil.copy(socket_unit, into / "p11p.socket")
    return [into / "p11p.service", into / "p11p.socket"]


def p11p_command() -> str:
    command = shutil.which("p11p")
    assert command, "p11p is not on PATH: run make build"
    return command


def test_units_pass_systemd_analyze_verify(systemd_tools: None, tmp_path: Path) -> None:
    units = verifiable_copy(UNITS / "p11p.service", UNITS / "p11p.socket", tmp_path,
                            p11p_command())
    result = verify(units)
    # verify exits 0 on settings it ignores: any line it prints is a finding
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_verify_catches_a_broken_unit(systemd_tools: None, tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting is reported."""
    units = verifiable_copy(UNITS / "p11p.service", UNITS / "p11p.socket", tmp_path,
                            p11p_command())
    units[0].write_text(units[0].read_text().replace("Type=notify", "Type=notfy"))
    result = verify(units)
    assert "Type" in result.stderr or "type" in result.stderr, result.stderr


def test_units_say_what_the_issue_asks(systemd_tools: None) -> None:
    service = unit_settings(UNITS / "p11p.service")
    assert service["Service.Type"] == ["notify"]
    assert service["Service.NotifyAccess"] == ["main"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes"), ("RestrictAddressFamilies", "AF_UNIX")):
        assert service[f"Service.{key}"] == [value], key
    assert service["Service.ExecStart"][0].split()[0] == UNIT_EXEC
    assert "p11p.socket" in service["Unit.Requires"][0]
    # least privilege: user p11p, its state directory its own and closed to the group
    assert service["Service.User"] == ["p11p"] and service["Service.Group"] == ["p11p"]
    assert service["Service.StateDirectory"] == ["p11p"]
    assert service["Service.StateDirectoryMode"] == ["0700"]
    assert service["Service.ReadWritePaths"] == ["/run/p11p"]
    # a restart leaves the applications' helpers to the next daemon (README "Operations")
    assert service["Service.KillMode"] == ["process"]
    sock = unit_settings(UNITS / "p11p.socket")
    from p11p.daemon.config import DEFAULT_SOCKET
    assert sock["Socket.ListenStream"] == [DEFAULT_SOCKET]
    assert sock["Socket.SocketMode"] == ["0660"]
    assert sock["Socket.SocketGroup"] == ["p11p"]
    # /run/p11p: the daemon (user p11p) writes its admin socket there, the group only enters
    assert sock["Socket.DirectoryMode"] == ["0750"]
    assert sock["Socket.ExecStartPost"] == ["/bin/chown p11p:p11p /run/p11p"]
    assert sock["Socket.Accept"] == ["no"]  # one daemon, handed the listening socket
    skeleton = (ROOT / "packaging" / "p11p.toml").read_text()
    assert f'socket     = "{DEFAULT_SOCKET}"' in skeleton


def test_installed_units_pass_verify(systemd_tools: None, tmp_path: Path) -> None:
    """`make install` rewrites the units for its PREFIX; what it writes still verifies,
    with ExecStart naming the launcher it installed, which runs p11p."""
    dest = tmp_path / "dest"
    make_install(dest, "PREFIX=/opt/p11p-test")
    unitdir = dest / "opt/p11p-test/lib/systemd/system"
    service = unitdir / "p11p.service"
    settings = unit_settings(service)
    assert settings["Service.ExecStart"][0].startswith(
        "/opt/p11p-test/bin/p11p daemon --config /etc/p11p/p11p.toml")
    assert settings["Service.User"] == ["p11p"] and settings["Service.Group"] == ["p11p"]
    assert "file:///opt/p11p-test/share/doc/p11p/README.md" in service.read_text()
    assert (dest / "opt/p11p-test/share/doc/p11p/README.md").is_file()
    launcher = dest / "opt/p11p-test/bin/p11p"
    units = verifiable_copy(service, unitdir / "p11p.socket", tmp_path / "check", str(launcher))
    result = verify(units)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr
    out = subprocess.run([str(launcher), "check-config", "--help"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "config" in out.stdout


# -- the daemon as systemd runs it -------------------------------------------------------


class ActivatedDaemon:
    """p11p started by systemd-socket-activate: it listens on `listen` and, at the first
    connection, execs the daemon (same PID) with LISTEN_PID/LISTEN_FDS: fd 3. The
    daemon's $NOTIFY_SOCKET is `notify`'s (abstract) address."""

    def __init__(self, daemon: Daemon, listen: Path) -> None:
        self.daemon = daemon
        self.listen = listen
        self.notify = NotifyListener(None)
        argv = ["systemd-socket-activate", "--listen", str(listen), "--fdname=p11p",
                "-E", "PATH", "-E", f"NOTIFY_SOCKET={self.notify.address}",
                sys.executable, "-m", "p11p.daemon", "daemon", "--config", str(daemon.config),
                "--log-level", "debug"]
        with open(daemon.log, "ab") as log:
            # Daemon.stop() stops it by PID, and the helpers with it
            daemon.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        if not wait_until(lambda: "Listening on" in daemon.log_text(), 10):
            self.stop()
            raise RuntimeError("systemd-socket-activate did not listen:\n" + daemon.log_text())

    def executable(self) -> str:
        return os.readlink(f"/proc/{self.daemon.pid}/exe")

    def stop(self) -> int | None:
        try:
            return self.daemon.stop()
        finally:
            self.notify.close()


def wait_until(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def list_slots(socket_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pkcs11-tool", "--module", str(CLIENT_SO), "-L"],
                          env={**os.environ, "P11P_SOCKET": str(socket_path)},
                          capture_output=True, text=True, timeout=20)


@pytest.fixture
def activated(systemd_tools: None, softhsm: SoftHSM, tmp_path: Path) -> Iterator[ActivatedDaemon]:
    """The daemon's own socket setting points elsewhere (run/p11p.sock): whatever
    answers on `activated.sock` is the inherited socket."""
    daemon = Daemon(tmp_path / "p11p", {"sys": one_member_group("p11p-sys", softhsm, "tokSys")})
    act = ActivatedDaemon(daemon, tmp_path / "activated.sock")
    try:
        yield act
    finally:
        act.stop()


def test_socket_activation_serves_a_real_client(activated: ActivatedDaemon) -> None:
    daemon = activated.daemon
    # the socket exists before the daemon runs; the first client starts it and waits
    # in the listen backlog until the daemon accepts on the inherited socket
    assert Path(activated.executable()).name == "systemd-socket-activate"
    first = list_slots(activated.listen)
    assert first.returncode == 0, first.stdout + first.stderr + daemon.log_text()
    assert "token label        : p11p-sys" in first.stdout, first.stdout
    # systemd-socket-activate exec'd the daemon: the same PID now runs Python
    assert activated.executable() == os.path.realpath(sys.executable)
    assert "Execing" in daemon.log_text()
    message = activated.notify.receive(10)
    assert message is not None and message[0] == "READY=1", daemon.log_text()
    # the daemon made no socket of its own: the configured path does not exist
    assert not daemon.socket.exists()
    again = list_slots(activated.listen)
    assert again.returncode == 0 and "p11p-sys" in again.stdout, again.stdout + again.stderr
    assert activated.stop() == 0, daemon.log_text()


def test_inherited_socket_path_survives_the_daemon(systemd_tools: None, softhsm: SoftHSM,
                                                  tmp_path: Path) -> None:
    """As in production, p11p.toml names the socket p11p.socket listens on. The daemon
    must not remove a socket it did not create: systemd still holds it for the next
    start, and a removed path cannot be connected to again."""
    daemon = Daemon(tmp_path / "p11p", {"sys": one_member_group("p11p-sys", softhsm, "tokSys")})
    daemon.config.write_text(daemon.config.read_text().replace(
        'socket = "run/p11p.sock"', f'socket = "{tmp_path / "p11p.sock"}"'))
    act = ActivatedDaemon(daemon, tmp_path / "p11p.sock")
    try:
        assert list_slots(act.listen).returncode == 0, daemon.log_text()
        assert act.stop() == 0
    finally:
        act.stop()
    assert act.listen.is_socket(), "the daemon removed the socket systemd passed it"


def test_ready_only_once_listening_and_members_probed(systemd_tools: None, softhsm: SoftHSM,
                                                      tmp_path: Path) -> None:
    """Not socket-activated: the daemon binds its own socket. The member's module takes
    1.5 s to initialise (faultsim), so a READY=1 sent before the probe would show."""
    rules = tmp_path / "slow.rules"
    rules.write_text("C_Initialize delay ms=1500\n")
    group = one_member_group("p11p-ready", softhsm, "tokSys").replace(
        f'module = "{SOFTHSM_SO}"', f'module = "{FAULTSIM_SO}"').replace(
        "env = {", f'env = {{ P11P_FAULTSIM_MODULE = "{SOFTHSM_SO}", '
                   f'P11P_FAULTSIM_RULES = "{rules}", ')
    daemon = Daemon(tmp_path / "p11p", {"ready": group})
    notify = NotifyListener(tmp_path / "notify.sock")
    argv = [sys.executable, "-m", "p11p.daemon", "daemon", "--config", str(daemon.config),
            "--log-level", "debug"]
    started = time.monotonic()
    with open(daemon.log, "ab") as log:
        daemon.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True,
                                       env={**os.environ, "NOTIFY_SOCKET": notify.address})
    try:
        message = notify.receive(20)
        assert message is not None, "no READY=1 within 20 s\n" + daemon.log_text()
        text, at = message
        # first thing on arrival: the client socket must accept at once, no retry
        accepted = connects(daemon.socket)
        assert text == "READY=1"
        assert accepted, "READY=1 came before the client socket accepted connections"
        assert at - started >= 1.4, "READY=1 came before the member's probe could finish"
        from p11p.daemon.cli import admin_request
        status = admin_request(daemon.config.parent / "run" / "p11p.sock.admin",
                               {"cmd": "status"})
        members = [m for g in status["groups"] for m in g["members"]]
        assert [m["state"] for m in members] == ["OK"], status
        assert notify.receive(0.2) is None  # READY=1 once, nothing else
        slots = list_slots(daemon.socket)
        assert slots.returncode == 0 and "p11p-ready" in slots.stdout, slots.stdout
    finally:
        assert daemon.stop() == 0, daemon.log_text()
        notify.close()


# -- the daemon as user p11p -------------------------------------------------------------


@pytest.fixture(scope="module")
def p11p_user() -> Iterator[ServiceUser]:
    """User p11p, made for these tests when the machine has none (and removed after)."""
    ensure_command("setpriv", "util-linux")
    user = ServiceUser("p11p")
    try:
        yield user
    finally:
        user.remove()


def as_client(gid: int, argv: list[str]) -> list[str]:
    """`argv` run as user nobody with group `gid` besides its own: an application that
    may use the socket, and nothing else of p11p's."""
    return ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--groups", str(gid), "--",
            *argv]


def stop_tree(pids: list[int], daemon: subprocess.Popen[bytes], uid: int) -> int | None:
    """SIGINT to the daemon (a stop for good: its helpers end with it), then SIGKILL to
    whatever of `pids` is left (still `uid`'s: not a PID used again since)."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGINT)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    for pid in pids:
        try:
            if uids_of(pid)[0] == uid:
                os.kill(pid, signal.SIGKILL)
        except (OSError, AssertionError):
            pass
    return daemon.returncode


@pytest.mark.timeout(120, func_only=True)
def test_daemon_and_helpers_run_as_user_p11p(systemd_tools: None,
                                             p11p_user: ServiceUser) -> None:
    """The production layout in a scratch directory: state/ is /var/lib/p11p (p11p's,
    0700), etc/ is /etc/p11p (root:p11p, 2750, files 0640), run/ is /run/p11p
    (p11p:p11p, 0750, as p11p.socket's ExecStartPost leaves it). `p11p init-default`,
    run as p11p, makes the SoftHSM2 tokens; systemd-socket-activate (root) holds the
    client socket (root:p11p, 0660) and execs the daemon as p11p. An application of
    another user, in group p11p, is served; the daemon and every helper run as p11p;
    the admin socket is root's and p11p's only."""
    user = p11p_user
    work = Path(tempfile.mkdtemp(prefix="p11p-user-"))  # pytest's tmp_path is root's, 0700
    pids: list[int] = []
    daemon: subprocess.Popen[bytes] | None = None
    try:
        work.chmod(0o755)
        state, etc, run = work / "state", work / "etc", work / "run"
        for path, uid, mode in ((state, user.uid, 0o700), (etc, 0, 0o2750),
                                (etc / "tokens.d", 0, 0o2750), (run, user.uid, 0o750)):
            path.mkdir()
            os.chown(path, uid, user.gid)
            path.chmod(mode)
        binds = interpreter_binds(user, work / "interpreter")
        python = [sys.executable, "-m", "p11p.daemon"]
        probe = subprocess.run(in_namespace(binds, as_user("p11p", [*python, "--help"])),
                               capture_output=True, text=True, timeout=60)
        if probe.returncode:
            pytest.skip(f"user p11p cannot run {sys.executable} with p11p: {probe.stderr}")

        made = subprocess.run(
            in_namespace(binds, as_user("p11p", [*python, "init-default", "--state-dir",
                                                 str(state / "demo")])),
            capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stdout + made.stderr
        token_files = [p for p in (state / "demo" / "softhsm" / "tokens").rglob("*")]
        assert token_files and {p.stat().st_uid for p in token_files} == {user.uid}

        sock = run / "p11p.sock"
        (etc / "p11p.toml").write_text(f'[daemon]\nsocket = "{sock}"\ntokens_dir = "tokens.d"\n')
        shutil.copy(state / "demo" / "tokens.d" / "demo.toml", etc / "tokens.d" / "demo.toml")
        for path in (etc / "p11p.toml", etc / "tokens.d" / "demo.toml"):
            os.chown(path, 0, user.gid)
            path.chmod(0o640)

        log = work / "daemon.log"
        argv = ["systemd-socket-activate", "--listen", str(sock), "--fdname=p11p", "-E", "PATH",
                *as_user("p11p", [*python, "daemon", "--config", str(etc / "p11p.toml"),
                                  "--log-level", "debug"])]
        with open(log, "ab") as out:
            daemon = subprocess.Popen(in_namespace(binds, argv), stdout=out, stderr=out,
                                      start_new_session=True)
        assert wait_until(lambda: "Listening on" in log.read_text(), 10), log.read_text()
        os.chown(sock, 0, user.gid)  # SocketGroup=p11p, SocketMode=0660
        sock.chmod(0o660)

        env = {**os.environ, "P11P_SOCKET": str(sock)}
        slots = subprocess.run(as_client(user.gid, ["pkcs11-tool", "--module", str(CLIENT_SO),
                                                    "-L"]),
                               env=env, capture_output=True, text=True, timeout=30)
        assert slots.returncode == 0, slots.stdout + slots.stderr + log.read_text()
        assert "token label        : p11p-demo" in slots.stdout, slots.stdout
        random = subprocess.run(as_client(user.gid, ["pkcs11-tool", "--module", str(CLIENT_SO),
                                                     "--generate-random", "32"]),
                                env=env, capture_output=True, timeout=30)
        assert random.returncode == 0 and len(random.stdout) == 32, \
            random.stderr.decode() + log.read_text()

        pids = process_tree(daemon.pid)
        helpers = [pid for pid in pids
                   if b"p11p.helper" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert helpers, f"no helper among {pids}"
        assert os.path.realpath(f"/proc/{daemon.pid}/exe") == os.path.realpath(sys.executable)
        assert {pid: uids_of(pid) for pid in pids} == \
            {pid: (user.uid,) * 4 for pid in pids}

        admin = run / "p11p.sock.admin"
        info = admin.stat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == user.uid
        from p11p.daemon.cli import admin_request
        status = admin_request(admin, {"cmd": "status"})  # root may
        assert [m["state"] for g in status["groups"] for m in g["members"]] == ["OK", "OK"]
        if os.path.exists("/usr/bin/python3"):  # an application of group p11p may not
            refused = subprocess.run(as_client(user.gid, [
                "/usr/bin/python3", "-c", "import socket, sys; "
                "socket.socket(socket.AF_UNIX).connect(sys.argv[1])", str(admin)]),
                capture_output=True, text=True, timeout=30)
            assert refused.returncode and "PermissionError" in refused.stderr, refused.stderr
        stopped, daemon = daemon, None
        assert stop_tree(pids, stopped, user.uid) == 0, log.read_text()
        assert sock.is_socket()  # systemd's, left for the next start
    finally:
        if daemon is not None:
            stop_tree(pids or process_tree(daemon.pid), daemon, user.uid)
        shutil.rmtree(work)


# -- systemctl restart ------------------------------------------------------------------

RESTART_APP = f"""
import sys, threading, time
import PyKCS11
from PyKCS11 import Mechanism
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
lib = PyKCS11.PyKCS11Lib()
lib.load({str(CLIENT_SO)!r})
slot = lib.getSlotList(tokenPresent=True)[0]
RW = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
s0 = lib.openSession(slot, RW)
s0.login("1234")
pub, priv = s0.generateKeyPair(
    [(PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_VERIFY, True),
     (PyKCS11.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107"))],
    [(PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_SIGN, True), (PyKCS11.CKA_PRIVATE, True)],
    mecha=Mechanism(PyKCS11.CKM_EC_KEY_PAIR_GEN))
point = bytes(s0.getAttributeValue(pub, [PyKCS11.CKA_EC_POINT])[0])[2:]
key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
stop, errors, done, slowest = threading.Event(), [], [0], [0.0]
SEARCH = sys.argv[1:] == ["search"]
def worker(n):
    s = lib.openSession(slot, RW)
    i = 0
    while not stop.is_set():
        data = bytes([n, i % 256]) * 16
        began = time.monotonic()
        try:
            if n == 0 and SEARCH:  # a search at every turn: a call the daemon answers
                found = s.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY)])
                assert [h.value() for h in found] == [pub.value()], found
                done[0] += 1
                slowest[0] = max(slowest[0], time.monotonic() - began)
                i += 1
                continue
            sig = bytes(s.sign(priv, data, Mechanism(PyKCS11.CKM_ECDSA)))
            key.verify(utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                                  int.from_bytes(sig[32:], "big")),
                       data, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            done[0] += 1
        except Exception as exc:
            errors.append(repr(exc))
        slowest[0] = max(slowest[0], time.monotonic() - began)
        i += 1
threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
for t in threads:
    t.start()
time.sleep(1.0)
print("loaded", flush=True)
sys.stdin.readline()
stop.set()
for t in threads:
    t.join()
print(done[0], len(errors), round(slowest[0], 3), int(s0.getSessionInfo().state), errors[:3],
      flush=True)
"""


def _unit_start(daemon: Daemon, sock: socket.socket, preamble: str = "") -> subprocess.Popen[bytes]:
    """The daemon as p11p.service starts it: the listening socket p11p.socket holds as
    fd 3, LISTEN_PID its own pid. `preamble`: Python run in the daemon first."""
    run = (f"{preamble}\nimport runpy\n"
           "runpy.run_module('p11p.daemon', run_name='__main__', alter_sys=True)")
    boot = ("import os, sys\n"
            f"os.dup2({sock.fileno()}, 3)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='p11p')\n"
            f"os.execv(sys.executable, [sys.executable, '-c', {run!r}, 'daemon', "
            f"'--config', {str(daemon.config)!r}, '--log-level', 'debug'])\n")
    with open(daemon.log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", boot], pass_fds=(sock.fileno(),),
                                stdout=log, stderr=log, start_new_session=True)
    daemon.proc = proc  # Daemon.stop() ends it, and the helpers it noted
    return proc


# an older client library: the daemon does not agree the link feature restart with it
OLDER_CLIENT = ("import p11p.daemon.hello as h\n"
                "h.FEATURES = tuple(f for f in h.FEATURES if f != 'restart')")


@pytest.mark.parametrize("client", ["current", "older"])
def test_systemctl_restart_keeps_applications_going(systemd_tools: None, softhsm: SoftHSM,
                                                     tmp_path: Path, client: str) -> None:
    """`systemctl restart p11p` with the installed units: p11p.socket keeps the listening
    socket; with KillMode=process only the daemon gets SIGTERM, and the next one is
    handed the same socket. An application signing in 8 threads with a session key sees
    nothing: every signature verifies, none fails or takes 3 s, its session stays logged
    in, and a thread searching at every turn (a call the daemon answers) meets no error.
    An application whose client library is older than the link feature `restart` (the
    daemons do not agree it) signs on as well and keeps its session; its calls to the
    daemon wait in the socket's backlog, but one under way at the stop may fail (README,
    Operations), so it does not search here."""
    preamble = OLDER_CLIENT if client == "older" else ""
    assert unit_settings(UNITS / "p11p.service")["Service.KillMode"] == ["process"]
    daemon = Daemon(tmp_path / "p11p", {"sys": one_member_group("p11p-sys", softhsm, "tokSys")})
    listen = tmp_path / "p11p.sock"
    daemon.config.write_text(daemon.config.read_text().replace(
        'socket = "run/p11p.sock"', f'socket = "{listen}"'))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(listen))
    sock.listen(64)
    app = None
    try:
        _unit_start(daemon, sock, preamble)
        app = subprocess.Popen([sys.executable, "-c", RESTART_APP,
                                *(["search"] if client == "current" else [])],
                               stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "P11P_SOCKET": str(listen)})
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().strip() == "loaded", daemon.log_text()[-2000:]
        for _ in range(2):  # systemctl restart: SIGTERM to the main process, then a start
            old = daemon.proc
            assert old is not None
            daemon.note_helpers()
            old.send_signal(signal.SIGTERM)
            assert old.wait(15) == 0
            _unit_start(daemon, sock, preamble)
            time.sleep(1.5)
        app.stdin.write("stop\n")
        app.stdin.flush()
        out, err = app.communicate(timeout=30)
    finally:
        if app is not None:
            app.kill()
        log = daemon.log_text()
        daemon.stop()
        sock.close()
    assert app.returncode == 0, err + log[-3000:]
    signed, errors, slowest, state, first = out.split(maxsplit=4)
    assert (int(errors), first.strip()) == (0, "[]"), (errors, first)
    assert int(signed) > 100 and float(slowest) < 3.0, out
    assert int(state) == 3, out  # CKS_RW_USER_FUNCTIONS: still logged in
    assert log.count("taken back (") >= 2, log[-3000:]
