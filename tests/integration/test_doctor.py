"""`p11p doctor` against a real daemon over a SoftHSM2 token, against a socket nobody
serves, and against a broken configuration; and the client library's one notice, on
stderr, when an application cannot reach the daemon."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit import CLIENT_SO, Daemon, SoftHSM, one_member_group
from p11p.daemon.config import DEFAULT_CONFIG

PIN = "doctor-Pq7-4913"  # distinctive: the tests look for it in every output
LINE = re.compile(r"^(OK  |WARN|FAIL|SKIP) ")


def doctor(*args: str, env: dict[str, str] | None = None,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("P11P_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "p11p.daemon", "doctor", *args], env=full,
                          input=stdin, capture_output=True, text=True, timeout=120)


def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    out = result.stdout.splitlines()
    assert all(LINE.match(line) for line in out), result.stdout
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    hsm = SoftHSM(tmp_path_factory.mktemp("doctor-hsm"))
    hsm.init_token("docA", pin=PIN)
    d = Daemon(tmp_path_factory.mktemp("doctor"), {
        "doc": one_member_group("doc", hsm, "docA"),
    })
    d.start()
    yield d
    d.stop()


def test_a_healthy_daemon_passes_every_check(served: Daemon) -> None:
    result = doctor("--config", str(served.config), "--module", str(CLIENT_SO))
    assert result.returncode == 0, result.stdout + result.stderr
    out = lines(result)
    assert all(line.startswith("OK   ") for line in out), result.stdout
    text = result.stdout
    assert f"OK   configuration {served.config}" in text
    for check in ("exists", "is a socket", "reachable by", "owned by the daemon's"):
        assert f"OK   socket {served.socket} {check}" in text, text
    assert "OK   daemon (admin socket" in text
    assert "OK   group doc member softhsm-docA: in service, token found" in text
    assert "OK   group doc (slot" in text
    assert "OK   test operation on doc (slot" in text
    assert "login" not in text  # no --pin, no login
    assert result.stderr == ""


def test_P11P_SOCKET_is_the_socket_checked(served: Daemon) -> None:
    """As in the client library, P11P_SOCKET wins over the configuration's socket."""
    result = doctor("--config", str(served.config), "--module", str(CLIENT_SO),
                    env={"P11P_SOCKET": str(served.socket)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OK   socket {served.socket} exists (from P11P_SOCKET)" in result.stdout


def test_pin_logs_in_and_is_shown_nowhere(served: Daemon) -> None:
    result = doctor("--config", str(served.config), "--module", str(CLIENT_SO), "--pin", PIN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^OK   login on doc \(PIN from --pin\): \d+ objects visible$",
                     result.stdout, re.M), result.stdout
    assert PIN not in result.stdout + result.stderr
    # read from stdin, so that it is not on the command line either
    piped = doctor("--config", str(served.config), "--module", str(CLIENT_SO), "--pin", "-",
                   stdin=PIN + "\n")
    assert piped.returncode == 0, piped.stdout + piped.stderr
    assert "OK   login on doc" in piped.stdout
    assert PIN not in piped.stdout + piped.stderr
    assert PIN not in served.log_text()


def test_a_wrong_pin_fails_without_showing_it(served: Daemon) -> None:
    wrong = "not-the-pin-5521"
    result = doctor("--config", str(served.config), "--module", str(CLIENT_SO), "--pin", wrong)
    assert result.returncode != 0
    assert "FAIL login on doc (PIN from --pin): CKR_PIN_INCORRECT — check the PIN" in result.stdout
    assert wrong not in result.stdout + result.stderr
    assert wrong not in served.log_text()


def test_no_daemon_at_the_socket(tmp_path: Path) -> None:
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("docB")
    stopped = Daemon(tmp_path / "p11p", {"doc": one_member_group("doc", hsm, "docB")})
    result = doctor("--config", str(stopped.config), "--module", str(CLIENT_SO))
    assert result.returncode != 0
    out = lines(result)
    assert out[0].startswith(f"OK   configuration {stopped.config}")
    assert out[1].startswith(f"FAIL socket {stopped.socket}: no such file"), result.stdout
    assert "start the daemon" in out[1]
    assert [line.split(":")[0] for line in out[2:]] == [
        "SKIP daemon", "SKIP groups and members", "SKIP test operation"]
    # the socket of the environment, as applications would use it
    missing = tmp_path / "elsewhere" / "p11p.sock"
    result = doctor("--config", str(stopped.config), env={"P11P_SOCKET": str(missing)})
    assert result.returncode != 0
    assert f"FAIL socket {missing}: no such file (from P11P_SOCKET)" in result.stdout
    # a socket file nobody listens on
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    result = doctor("--config", str(stopped.config), env={"P11P_SOCKET": str(stale)})
    assert result.returncode != 0
    assert f"FAIL socket {stale}: nobody listens" in result.stdout


def test_a_group_out_of_service_fails_and_stops(tmp_path: Path) -> None:
    """Its only member's token is missing: applications of that group get nothing."""
    hsm = SoftHSM(tmp_path / "hsm")
    d = Daemon(tmp_path / "p11p", {"doc": one_member_group("doc", hsm, "no-such-token")})
    d.start()
    try:
        result = doctor("--config", str(d.config), "--module", str(CLIENT_SO))
    finally:
        d.stop()
    assert result.returncode != 0
    out = lines(result)
    member = next(line for line in out if "member softhsm-no-such-token" in line)
    assert member.startswith("FAIL group doc member softhsm-no-such-token: "), result.stdout
    assert "CKR_TOKEN_NOT_PRESENT" in member and "token not found" in member
    assert out[-2].startswith("FAIL group doc: no member in service"), result.stdout
    assert out[-1] == "SKIP test operation: not checked after the failure above"


@pytest.mark.skipif(DEFAULT_CONFIG.exists(), reason=f"{DEFAULT_CONFIG} exists here")
def test_no_configuration_checks_the_socket_alone(tmp_path: Path) -> None:
    missing = tmp_path / "p11p.sock"
    result = doctor(env={"P11P_SOCKET": str(missing), "XDG_STATE_HOME": str(tmp_path)})
    assert result.returncode != 0
    out = lines(result)
    assert out[0].startswith("WARN configuration: none given"), result.stdout
    assert out[1].startswith(f"FAIL socket {missing}: no such file"), result.stdout


def test_a_configuration_error_names_file_line_and_key(tmp_path: Path) -> None:
    hsm = SoftHSM(tmp_path / "hsm")
    broken = Daemon(tmp_path / "p11p", {
        "doc": one_member_group("doc", hsm, "docC").replace('policy = "failover"',
                                                              'policy = "sideways"'),
    })
    token_file = broken.root / "tokens.d" / "doc.toml"
    line = next(n for n, text in enumerate(token_file.read_text().splitlines(), 1)
                if "sideways" in text)
    result = doctor("--config", str(broken.config))
    assert result.returncode != 0
    out = lines(result)
    assert out[0].startswith(f"FAIL configuration: {token_file}:{line}: policy: must be one of"), \
        result.stdout
    assert f"p11p check-config {broken.config}" in out[0]
    assert out[1:] == [f"SKIP {stage}: not checked after the failure above" for stage in
                       ("socket", "daemon", "groups and members", "test operation")]


# ---- the client library's notice --------------------------------------------------------

APP = r"""
import sys
import threading

import PyKCS11

lib = PyKCS11.PyKCS11Lib()
lib.load(sys.argv[1])  # C_Initialize: no daemon needed
for _ in range(3):
    print("slots", len(lib.getSlotList()))
    try:
        lib.getTokenInfo(0)
    except PyKCS11.PyKCS11Error as exc:
        print("rv", hex(exc.value))
threads = [threading.Thread(target=lib.getSlotList) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("done")
"""


def test_the_client_says_once_that_it_cannot_reach_the_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "run" / "p11p.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P11P_")}
    env["P11P_SOCKET"] = str(missing)
    for _ in range(2):  # once per process: the second process says it again
        app = subprocess.run([sys.executable, "-c", APP, str(CLIENT_SO)], env=env,
                             capture_output=True, text=True, timeout=60)
        assert app.returncode == 0, app.stdout + app.stderr
        # the calls fail as before: no slot listed, every other call CKR_DEVICE_ERROR
        assert app.stdout.split("\n") == ["slots 0", "rv 0x30"] * 3 + ["done", ""], app.stdout
        assert app.stderr.splitlines() == [
            f"p11p-client: cannot reach the p11p daemon at {missing} (No such file or "
            "directory); run 'p11p doctor'"], app.stderr
