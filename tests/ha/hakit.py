"""HA test kit: a p11p group of members behind p11p-faultsim.so, and the workload
application that drives it (the fixtures that make them are in conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from kit import CLIENT_SO, FAULTSIM_SO, SOFTHSM_SO, USER_PIN, Daemon, SoftHSM, helper_pids

HERE = Path(__file__).resolve().parent


class HAGroup:
    """A daemon with one group of members behind the fault module, and their rules."""

    def __init__(self, root: Path, hsm: SoftHSM, policy: str, tokens: list[str],
                 extra: str = "", rules: dict[str, str] | None = None,
                 daemon_extra: str = "", call_timeout: float = 1.5,
                 member_env: dict[str, str] | None = None) -> None:
        """`member_env`: more of each member's environment (kit.sanitized_helper, say)."""
        root.mkdir(parents=True, exist_ok=True)
        self.rules = {t: root / f"{t}.rules" for t in tokens}
        self.faultlog = root / "faults.log"
        members = ""
        more = "".join(f', {k} = "{v}"' for k, v in (member_env or {}).items())
        for t in tokens:
            self.rules[t].write_text((rules or {}).get(t, ""))
            members += f"""
[[member]]
name = "{t}"
module = "{FAULTSIM_SO}"
token = "{t}"
env = {{ P11P_FAULTSIM_MODULE = "{SOFTHSM_SO}", P11P_FAULTSIM_RULES = "{self.rules[t]}", P11P_FAULTSIM_LOG = "{self.faultlog}", SOFTHSM2_CONF = "{hsm.conf}"{more} }}
"""
        body = f"""
label = "ha"
policy = "{policy}"
call_timeout = {call_timeout}
hold_timeout = 2
{extra}
[recovery]
interval = 0.2
attempts = 0
max_interval = 2
{members}"""
        self.daemon = Daemon(root, {"ha": body}, daemon_extra)

    def set_rules(self, token: str, text: str) -> None:
        tmp = self.rules[token].with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.rules[token])

    def status(self) -> dict[str, Any]:
        from p11p.daemon.cli import admin_request
        path = self.daemon.socket.with_name(self.daemon.socket.name + ".admin")
        return admin_request(path, {"cmd": "status"})

    def prometheus(self) -> str:
        r = subprocess.run([sys.executable, "-m", "p11p.daemon", "status", "--prometheus",
                            "--config", str(self.daemon.config)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

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

    def logged_in(self, app_pid: int) -> list[str]:
        """The members where the application (its latest context) is logged in."""
        ctxs = [c for c in self.status()["contexts"] if c["pid"] == app_pid]
        return list(ctxs[-1]["logged_in"]) if ctxs else []

    def wait_logged_in(self, app_pid: int, members: list[str], timeout: float = 10.0) -> None:
        """Until the application is logged in on each of `members` (the daemon logs a
        logged-in application in on a member in service in the background)."""
        start = time.monotonic()
        while not set(members) <= set(self.logged_in(app_pid)):
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not logged in on {members} after {timeout}s: "
                                     f"{self.logged_in(app_pid)}")
            time.sleep(0.02)

    def app_helper(self, app_pid: int, member: str) -> int:
        """The helper of the application (its latest context) on `member`: a helper
        may have served another application before (the daemon recycles them)."""
        import re
        text = self.daemon.log_text()
        ctxs = re.findall(rf"ctx=(\w+) pid={app_pid} started", text)
        assert ctxs, "no context logged for the application"
        found = re.findall(rf"ctx={ctxs[-1]} pid={app_pid} member={member} helper pid=(\d+)",
                           text)
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




def ha_softhsm(root: Path, keys: Path, labels: tuple[str, ...]) -> SoftHSM:
    """SoftHSM2 tokens with these labels, each holding the keys of `keys` (keys.json); each
    token's first token.object is kept beside them (repair_token_files)."""
    hsm = SoftHSM(root)
    for label in labels:
        hsm.init_token(label)
        subprocess.run([sys.executable, str(HERE / "import_keys.py"), str(SOFTHSM_SO), label,
                        USER_PIN, str(keys)], env={**os.environ, **hsm.env}, check=True)
    for label, path in token_files(hsm, labels).items():
        (hsm.root / f"{label}.token.object").write_bytes(path.read_bytes())
    return hsm


def token_files(hsm: SoftHSM, labels: tuple[str, ...]) -> dict[str, Path]:
    """Each token's token.object (SoftHSM2's file store) by label."""
    found = {}
    for path in hsm.tokens.glob("*/token.object"):
        data = path.read_bytes()
        for label in labels:
            if label.encode().ljust(32) in data:
                found[label] = path
    return found


def repair_token_files(hsm: SoftHSM, files: dict[str, Path]) -> list[str]:
    """SoftHSM2 rewrites its token.object in place (a login's PIN flags, say): a helper
    killed meanwhile (a test's kill, or p11p ending a hung one, as it must) leaves it
    truncated, and that token is gone for every later user of it. Not p11p's doing: each
    damaged file of `files` (by label) is put back as ha_softhsm kept it. The labels
    repaired."""
    repaired = []
    for label, path in files.items():
        backup = hsm.root / f"{label}.token.object"
        if backup.exists() and path.exists() and label.encode().ljust(32) not in path.read_bytes():
            size = path.stat().st_size
            path.write_bytes(backup.read_bytes())
            repaired.append(label)
            print(f"{label}'s SoftHSM2 token.object was damaged ({size} bytes); put back",
                  flush=True)
    return repaired


def make_keys(path: Path) -> Path:
    """keys.json as tests/ha/import_keys.py reads it: fresh EC, RSA and AES keys and
    values, the same for every token they are imported into."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
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
    path.write_text(json.dumps(keys))
    return path


class PyApp:
    """An application process running PyKCS11 on p11p-client.so (tests/ha/pyapp.py):
    `run(code)` runs Python statements there and returns what `_` ended as (repr), or
    raises CKRError with the CK_RV that PyKCS11 raised."""

    def __init__(self, daemon: Daemon | None, module: Path = CLIENT_SO,
                 env: dict[str, str] | None = None) -> None:
        """Through `daemon`; or, with daemon None, on `module` directly (with `env`)."""
        extra = daemon.env if daemon is not None else (env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "pyapp.py"), str(module)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env={**os.environ, **extra})
        assert self._read() == {"value": "started"}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"application exited with {self.proc.wait()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def run(self, code: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "rv" in out:
            raise CKRError(out["rv"])
        if "error" in out:
            raise AssertionError(out["error"])
        return str(out["value"])

    def rv(self, code: str) -> int:
        """The CK_RV the statements ended with (0 when they ran through)."""
        try:
            self.run(code)
        except CKRError as exc:
            return exc.rv
        return 0

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()


class CKRError(Exception):
    def __init__(self, rv: int) -> None:
        super().__init__(f"CK_RV {rv:#x}")
        self.rv = rv
