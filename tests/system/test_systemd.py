"""systemd: the units pass `systemd-analyze verify`; the daemon serves a real client
through a socket inherited from `systemd-socket-activate`; READY=1 reaches
$NOTIFY_SOCKET only once the client socket accepts and the members were probed.

No systemd runs here as PID 1: `systemd-analyze verify` and `systemd-socket-activate`
work without it. Every process a test starts is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
from syskit import NotifyListener, connects, ensure_command, make_install

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
    sock = unit_settings(UNITS / "p11p.socket")
    from p11p.daemon.config import DEFAULT_SOCKET
    assert sock["Socket.ListenStream"] == [DEFAULT_SOCKET]
    assert sock["Socket.SocketMode"] == ["0660"]
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
    assert unit_settings(service)["Service.ExecStart"][0].startswith(
        "/opt/p11p-test/bin/p11p daemon --config /etc/p11p/p11p.toml")
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
