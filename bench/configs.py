"""The configurations under test, each set up and torn down by the benchmark: SoftHSM2
tokens in a temporary directory, SoftHSM2 directly, p11p daemons with one or more members
(plain, or behind p11p-faultsim.so as modeled HSMs), and p11-kit's remoting of a token.
Daemons and the p11-kit server are children of the benchmark, stopped by PID."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner import ROOT, Target, setup_keys

SOFTHSM_SO = Path("/usr/lib/softhsm/libsofthsm2.so")
P11KIT_CLIENT_SO = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
GROUP_LABEL = "bench"


def _load_kit() -> Any:
    """tests/kit.py, the project's test kit (SoftHSM tokens, the daemon by PID)."""
    spec = importlib.util.spec_from_file_location("p11p_test_kit", ROOT / "tests" / "kit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kit = _load_kit()


class Tokens:
    """SoftHSM2 tokens in one directory, each holding the benchmark keys."""

    def __init__(self, root: Path, labels: list[str]) -> None:
        self.hsm = kit.SoftHSM(root)
        self.labels = labels
        for label in labels:
            self.hsm.init_token(label)
            setup_keys(self.direct(label))

    def direct(self, label: str = "tokA") -> Target:
        return Target("direct", SOFTHSM_SO, label, dict(self.hsm.env))


class P11pGroup:
    """A running p11p daemon serving one group, `bench`, of the given members."""

    def __init__(self, name: str, daemon: Any, rules: dict[str, Path]) -> None:
        self.name = name
        self.daemon = daemon
        self.rules = rules  # member -> its faultsim rules file (modeled HSMs only)
        self.target = Target(name, kit.CLIENT_SO, GROUP_LABEL, dict(daemon.env))

    def set_rules(self, member: str, text: str) -> None:
        """Replaces a member's fault rules atomically (faultsim re-reads the file)."""
        tmp = self.rules[member].with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.rules[member])

    def helpers(self, member: str | None = None) -> list[int]:
        """PIDs of the daemon's helpers, or of those serving `member` (modeled HSMs: told
        apart by the rules file in their environment)."""
        pids = kit.helper_pids(self.daemon.pid)
        if member is None:
            return list(pids)
        mark = f"P11P_FAULTSIM_RULES={self.rules[member]}".encode()
        out = []
        for pid in pids:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mark in environ:
                out.append(pid)
        return out

    def members(self) -> list[dict[str, Any]]:
        """The members as `p11p status` reports them (name, state, sessions, ...)."""
        from p11p.daemon.cli import admin_request
        path = self.daemon.socket.with_name(self.daemon.socket.name + ".admin")
        try:
            (group,) = admin_request(path, {"cmd": "status"})["groups"]
        except SystemExit as exc:  # the CLI's way to say the daemon is unreachable
            raise RuntimeError(str(exc)) from None
        members: list[dict[str, Any]] = group["members"]
        return members

    def member_states(self) -> dict[str, str]:
        return {m["name"]: m["state"] for m in self.members()}


def _member(tokens: Tokens, name: str, token: str, rules: Path | None,
            fault_log: Path | None) -> str:
    env = {"SOFTHSM2_CONF": str(tokens.hsm.conf)}
    module = SOFTHSM_SO
    if rules is not None:
        module = kit.FAULTSIM_SO
        env.update(P11P_FAULTSIM_MODULE=str(SOFTHSM_SO), P11P_FAULTSIM_RULES=str(rules))
        if fault_log is not None:
            env["P11P_FAULTSIM_LOG"] = str(fault_log)
    pairs = ", ".join(f'{k} = "{v}"' for k, v in env.items())
    return (f'[[member]]\nname = "{name}"\nmodule = "{module}"\ntoken = "{token}"\n'
            f"env = {{ {pairs} }}\n")


@contextmanager
def p11p(tokens: Tokens, root: Path, name: str, members: list[str], policy: str = "balance",
         rules: dict[str, str] | None = None, settings: str = "",
         fault_log: Path | None = None, daemon_extra: str = "") -> Iterator[P11pGroup]:
    """A daemon with the group `bench` over `members` (token labels). With `rules`, every
    member sits behind p11p-faultsim.so with those rules (member -> text), logging the
    faults it applies to `fault_log`. `settings`: more lines for the group file,
    `daemon_extra` for [daemon]. The applications' state files go to tmpfs (/dev/shm),
    as they do in production (/run/p11p/state), not beside the bench's socket on disk."""
    root.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    state = shm / f"p11p-bench-{os.getpid()}-{name}" if shm.is_dir() else None
    if state is not None and "state_dir" not in daemon_extra:
        daemon_extra += f'state_dir = "{state}"\n'

    rule_files: dict[str, Path] = {}
    body = f'label = "{GROUP_LABEL}"\npolicy = "{policy}"\n{settings}\n'
    for token in members:
        path = None
        if rules is not None:
            path = rule_files[token] = root / f"{token}.rules"
            path.write_text(rules.get(token, ""))
        body += _member(tokens, token, token, path, fault_log)
    daemon = kit.Daemon(root, {GROUP_LABEL: body}, daemon_extra)
    daemon.start(log_level="info")
    try:
        yield P11pGroup(name, daemon, rule_files)
    finally:
        daemon.stop()
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)


@contextmanager
def p11kit(tokens: Tokens, root: Path, token: str = "tokA") -> Iterator[Target]:
    """`p11-kit server` exporting `token`; the target goes through Debian's p11-kit-client.so."""
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "p11-kit.sock"
    proc = subprocess.Popen(
        ["p11-kit", "server", "-f", "-n", str(sock), "--provider", str(SOFTHSM_SO),
         f"pkcs11:token={token}"],
        env={**os.environ, **tokens.hsm.env}, stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    pids = {proc.pid}
    try:
        address = None
        assert proc.stdout is not None
        for line in proc.stdout:  # "P11_KIT_SERVER_ADDRESS=...; export ...;" then the PID
            for part in line.split(";"):
                key, _, value = part.strip().partition("=")
                if key == "P11_KIT_SERVER_ADDRESS":
                    address = value
                elif key == "P11_KIT_SERVER_PID":
                    pids.add(int(value))
            if "P11_KIT_SERVER_PID" in line:
                break
        if address is None:
            raise RuntimeError(f"p11-kit server printed no address (exit {proc.poll()})")
        yield Target("p11-kit", P11KIT_CLIENT_SO, token, {"P11_KIT_SERVER_ADDRESS": address})
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
