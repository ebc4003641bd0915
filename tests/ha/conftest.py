"""HA fixtures: SoftHSM2 tokens holding the same imported keys, each put behind
p11p-faultsim.so, grouped by a p11p daemon; and a workload application to drive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from kit import CLIENT_SO, FAULTSIM_SO, SOFTHSM_SO, USER_PIN, Daemon, SoftHSM, helper_pids

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ha_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(65537, 2048)

    def pem(k: Any) -> str:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()).decode()

    def pub(k: Any) -> str:
        return k.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    keys = {"ec_private": pem(ec_key), "ec_public": pub(ec_key), "rsa_private": pem(rsa_key),
            "rsa_public": pub(rsa_key), "aes": os.urandom(32).hex(), "kek": os.urandom(32).hex(),
            "secret": os.urandom(24).hex(), "find_values": [os.urandom(8).hex() for _ in range(6)]}
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps(keys))
    return path


@pytest.fixture(scope="session")
def ha_tokens(tmp_path_factory: pytest.TempPathFactory, ha_keys: Path) -> SoftHSM:
    hsm = SoftHSM(tmp_path_factory.mktemp("ha-softhsm"))
    for label in ("hsmA", "hsmB", "hsmC"):
        hsm.init_token(label)
        subprocess.run([sys.executable, str(HERE / "import_keys.py"), str(SOFTHSM_SO), label,
                        USER_PIN, str(ha_keys)], env={**os.environ, **hsm.env}, check=True)
    return hsm


class HAGroup:
    """A daemon with one group of members behind the fault module, and their rules."""

    def __init__(self, root: Path, hsm: SoftHSM, policy: str, tokens: list[str],
                 extra: str = "", rules: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.rules = {t: root / f"{t}.rules" for t in tokens}
        self.faultlog = root / "faults.log"
        members = ""
        for t in tokens:
            self.rules[t].write_text((rules or {}).get(t, ""))
            members += f"""
[[member]]
name = "{t}"
module = "{FAULTSIM_SO}"
token = "{t}"
env = {{ P11P_FAULTSIM_MODULE = "{SOFTHSM_SO}", P11P_FAULTSIM_RULES = "{self.rules[t]}", P11P_FAULTSIM_LOG = "{self.faultlog}", SOFTHSM2_CONF = "{hsm.conf}" }}
"""
        body = f"""
label = "ha"
policy = "{policy}"
call_timeout = 1.5
hold_timeout = 2
{extra}
[recovery]
interval = 0.2
attempts = 0
{members}"""
        self.daemon = Daemon(root, {"ha": body})

    def set_rules(self, token: str, text: str) -> None:
        tmp = self.rules[token].with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.rules[token])

    def status(self) -> dict[str, Any]:
        from p11p.daemon.cli import admin_request
        path = self.daemon.socket.with_name(self.daemon.socket.name + ".admin")
        return admin_request(path, {"cmd": "status"})

    def member(self, name: str) -> dict[str, Any]:
        (g,) = self.status()["groups"]
        return next(m for m in g["members"] if m["name"] == name)

    def wait_state(self, name: str, state: str, timeout: float = 20.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.member(name)["state"] == state:
                return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"{name} not {state} after {timeout}s: {self.member(name)}")

    def app_helper(self, app_pid: int, member: str) -> int:
        import re
        found = re.findall(rf"pid={app_pid} member={member} helper pid=(\d+)", self.daemon.log_text())
        assert found, "no helper logged for the application"
        pid = int(found[-1])
        assert pid in helper_pids(self.daemon.pid)
        return pid


class WorkloadApp:
    def __init__(self, daemon: Daemon, keys: Path, label: str = "ha") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "workload_app.py"), str(CLIENT_SO), label, USER_PIN,
             str(keys)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **daemon.env})
        assert self.read() == "started"

    def read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"application exited with {self.proc.wait()}")
        return line.strip()

    def send(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def ha_factory(tmp_path: Path, ha_tokens: SoftHSM) -> Iterator[Any]:
    made: list[HAGroup] = []

    def make(policy: str, tokens: list[str], **kw: Any) -> HAGroup:
        g = HAGroup(tmp_path / f"g{len(made)}", ha_tokens, policy, tokens, **kw)
        made.append(g)
        g.daemon.start()
        return g

    yield make
    for g in made:
        g.daemon.stop()
