"""Helpers forked by a fork server per member (daemon/forkserver.py, helper/forkserver.py):
they serve as helpers started anew did, their deaths are seen, a fork server that dies
is started again, nothing outlives a killed daemon but the applications' helpers, each
waiting for a restarted daemon no longer than its application lives and adopt_timeout
(daemon/resume.py), each member's environment is its own, and a module that does not
load is reported as before."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hakit import HERE, HAGroup, PyApp
from kit import (
    FAULTSIM_SO,
    SOFTHSM_SO,
    USER_PIN,
    Daemon,
    SoftHSM,
    children,
    fork_server_pids,
    helper_pids,
    wait_for,
)

# PyKCS11 through p11p-client.so: an ECDSA signature (of a SHA-256 digest) on the token, verified on the token
# with a session public key made from keys.json, and by `cryptography`
APP = f"""
import json
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
keys = json.load(open({{keys!r}}))
public = serialization.load_pem_public_key(keys["ec_public"].encode())
point = public.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)
slot = lib.getSlotList(tokenPresent=True)[0]
s = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
s.login({USER_PIN!r})
priv = s.findObjects([(P.CKA_CLASS, P.CKO_PRIVATE_KEY), (P.CKA_LABEL, "ha-ec")])[0]
pub = s.createObject([(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_KEY_TYPE, P.CKK_EC),
                      (P.CKA_TOKEN, False), (P.CKA_VERIFY, True),
                      (P.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")),
                      (P.CKA_EC_POINT, bytes([4, len(point)]) + point)])

def signs(data=b"forked"):
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    data = digest.finalize()
    mech = P.Mechanism(P.CKM_ECDSA)
    sig = bytes(s.sign(priv, data, mech))
    r, t = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    public.verify(encode_dss_signature(r, t), data, ec.ECDSA(Prehashed(hashes.SHA256())))
    return s.verify(pub, data, sig, mech)
"""


def _app(group: HAGroup, keys: Path) -> PyApp:
    app = PyApp(group.daemon)
    app.run(APP.format(keys=str(keys)))
    return app


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_forked_helper_signs_and_verifies(ha_factory: Any, ha_keys: Path) -> None:
    """Each member has a fork server; the application's helpers are its children, each in
    a process group of its own in the daemon's session (daemon/forkserver.own_group),
    and sign and verify through PyKCS11."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    servers = fork_server_pids(group.daemon.pid)
    assert len(servers) == 2, servers
    app = _app(group, ha_keys)
    try:
        for _ in range(3):
            assert app.run("_ = signs()") == "True"
        helper = group.app_helper(app.proc.pid, "hsmA")
        assert _parent(helper) in servers
        assert all(len(os.listdir(f"/proc/{s}/task")) == 1 for s in servers)  # no thread
        # a Ctrl-C at the daemon's terminal does not reach it; the kernel's autogroup
        # scheduling counts it with the daemon, not as a session of its own
        assert (os.getpgid(helper), os.getsid(helper)) == (helper, os.getsid(group.daemon.pid))
        assert all(os.getpgid(s) == s and os.getsid(s) == os.getsid(group.daemon.pid)
                   for s in servers)
        assert not any(b"p11p.helper" in Path(f"/proc/{p}/cmdline").read_bytes()
                       for p in children(group.daemon.pid) if p not in servers)
    finally:
        app.close()


def test_a_killed_forked_helper_fails_its_member_over(ha_factory: Any, ha_keys: Path) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    app = _app(group, ha_keys)
    try:
        assert app.run("_ = signs()") == "True"
        os.kill(group.app_helper(app.proc.pid, "hsmA"), signal.SIGKILL)
        assert wait_for(lambda: "helper killed by SIGKILL" in group.daemon.log_text(), 5), \
            group.daemon.log_text()[-3000:]
        assert app.run("_ = signs()") == "True"  # on hsmB, or on hsmA recovered
        group.wait_state("hsmA", "OK", timeout=15)
        assert app.run("_ = signs()") == "True"
    finally:
        app.close()


def test_a_killed_fork_server_is_started_again(ha_factory: Any, ha_keys: Path) -> None:
    """SIGKILL to hsmA's fork server: the application's helper stays (it no longer dies
    with its fork server: it may outlive the daemon too) and serves on; the warm ones go
    with it; the next helper start forks from a new one; applications are served
    throughout."""
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"])
    app = _app(group, ha_keys)
    try:
        helper = group.app_helper(app.proc.pid, "hsmA")
        server = _parent(helper)
        warm = [p for p in children(server) if p != helper]
        started = f"pid={app.proc.pid} member=hsmA helper pid="
        before = group.daemon.log_text().count(started)
        os.kill(server, signal.SIGKILL)
        assert wait_for(lambda: f"fork server pid={server} ended" in group.daemon.log_text(), 5)
        assert wait_for(lambda: not any(_alive(p) for p in warm), 5)
        assert app.run("_ = signs()") == "True"
        assert _alive(helper) and group.daemon.log_text().count(started) == before
        group.wait_state("hsmA", "OK", timeout=15)
        assert wait_for(lambda: len(fork_server_pids(group.daemon.pid)) == 2, 10)
        assert server not in fork_server_pids(group.daemon.pid)
        other = _app(group, ha_keys)
        try:
            assert other.run("_ = signs()") == "True"
            assert _parent(group.app_helper(other.proc.pid, "hsmA")) != server
        finally:
            other.close()
    finally:
        app.close()


def _adoptable() -> set[int]:
    """Helpers (of any daemon) told to outlive their daemon: each listens on an abstract
    name of its own, p11p-helper-PID-... (helper/loop.py, ADOPTABLE)."""
    pids = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("@p11p-helper-"):
            pids.add(int(fields[7].split("-")[2]))
    return pids


def _settled(group: HAGroup, apps: list[PyApp], snap: dict[str, Any]) -> bool:
    """Whether the daemon's helpers are all accounted for (into `snap`): each one's start
    logged, the applications' ones (as the log names them) exactly those told to outlive
    the daemon, and the processes the same before and after the log was read."""
    servers, helpers = fork_server_pids(group.daemon.pid), helper_pids(group.daemon.pid)
    log = group.daemon.log_text()
    mine = [{group.app_helper(app.proc.pid, m) for m in ("hsmA", "hsmB")
             if f"pid={app.proc.pid} member={m} helper pid=" in log} for app in apps]
    snap.update(servers=servers, helpers=helpers, mine=mine)
    logged = {int(p) for p in re.findall(r"helper pid=(\d+)", log)}
    ours = set().union(*mine)
    return (set(helpers) <= logged and ours == _adoptable() & set(helpers)
            and helper_pids(group.daemon.pid) == helpers
            and fork_server_pids(group.daemon.pid) == servers)


def test_nothing_outlives_a_killed_daemon(ha_factory: Any, ha_keys: Path) -> None:
    """The fork servers and the warm helpers end with the daemon; each application's
    helpers wait for a restarted daemon while their application lives (and no longer
    than adopt_timeout): the first application's end ends its helpers at once, the
    second one's go when adopt_timeout (9 s here) is over."""
    group: HAGroup = ha_factory("balance", ["hsmA", "hsmB"], daemon_extra="adopt_timeout = 9\n")
    apps = [_app(group, ha_keys) for _ in range(2)]
    try:
        for app in apps:
            assert app.run("_ = signs()") == "True"
        # settled first: a helper the daemon still starts or hands to an application
        # (a refill of the warm pool, a context's start on the second member) is told
        # to outlive it only then, and would be taken for one that must not
        snap: dict[str, Any] = {}
        assert wait_for(lambda: _settled(group, apps, snap), 10), snap
        servers, helpers, mine = snap["servers"], snap["helpers"], snap["mine"]
        # two servers; a helper per application at least (balance places their sessions
        # on either member), and the warm ones
        assert len(servers) == 2 and len(helpers) >= 2, (servers, helpers)
        assert all(mine), mine
        group.daemon.kill()
        killed = time.monotonic()
        # told to outlive the daemon when it died: the applications' helpers, and one the
        # daemon gave an application after the snapshot (a standby login's on the other
        # member), which would otherwise be counted among those that must die at once
        # and keep the wait below to adopt_timeout
        outliving = _adoptable() & set(helpers)
        assert set().union(*mine) <= outliving, (mine, outliving)
        others = [p for p in servers + helpers if p not in outliving]
        assert wait_for(lambda: not any(_alive(p) for p in others), 10), \
            [p for p in others if _alive(p)]
        gone_after = time.monotonic() - killed
        assert all(_alive(p) for m in mine for p in m), \
            (mine, [p for m in mine for p in m if not _alive(p)], f"{gone_after:.2f} s")
        apps[0].close()
        assert wait_for(lambda: not any(_alive(p) for p in mine[0]), 3), mine[0]
        assert all(_alive(p) for p in mine[1]) or time.monotonic() - killed > 8.5
        assert wait_for(lambda: not any(_alive(p) for p in mine[1]), 10), mine[1]
        assert time.monotonic() - killed > 8.5
    finally:
        for app in apps:
            app.close()


def test_each_member_sees_its_own_environment(tmp_path: Path, ha_keys: Path) -> None:
    """Two members, each with a SoftHSM2 configuration holding only its own token: the
    environment a forked helper's module reads is its member's."""
    members = ""
    for label in ("envA", "envB"):
        hsm = SoftHSM(tmp_path / label)
        hsm.init_token(label)
        subprocess.run([sys.executable, str(HERE / "import_keys.py"), str(SOFTHSM_SO), label,
                        USER_PIN, str(ha_keys)], env={**os.environ, **hsm.env}, check=True)
        members += (f'[[member]]\nname = "{label}"\nmodule = "{SOFTHSM_SO}"\n'
                    f'token = "{label}"\nenv = {{ SOFTHSM2_CONF = "{hsm.conf}" }}\n')
    daemon = Daemon(tmp_path / "d", {"env": f'label = "env"\npolicy = "balance"\n{members}'})
    daemon.start()
    try:
        status = subprocess.run([sys.executable, "-m", "p11p.daemon", "status", "--json",
                                 "--config", str(daemon.config)], capture_output=True, text=True)
        (group,) = json.loads(status.stdout)["groups"]
        assert {m["name"]: m["state"] for m in group["members"]} == \
            {"envA": "OK", "envB": "OK"}, status.stdout
        assert len(fork_server_pids(daemon.pid)) == 2
    finally:
        daemon.stop()


def test_a_module_that_does_not_load_is_reported(tmp_path: Path) -> None:
    """The fault module on a vendor module that is not there: the forked helper's ready
    frame carries the error, which the daemon logs as it did; the member is failed."""
    body = (f'label = "bad"\n[[member]]\nname = "broken"\nmodule = "{FAULTSIM_SO}"\n'
            f'token = "t"\nenv = {{ P11P_FAULTSIM_MODULE = "{tmp_path}/missing.so" }}\n')
    daemon = Daemon(tmp_path / "d", {"bad": body})
    daemon.start()
    try:
        assert wait_for(lambda: "module failed to load" in daemon.log_text(), 10), \
            daemon.log_text()[-3000:]
        assert len(fork_server_pids(daemon.pid)) == 1
    finally:
        daemon.stop()


@pytest.mark.parametrize("fork_server", ["true", "false"])
def test_helpers_serve_with_the_fork_server_on_and_off(ha_factory: Any, ha_keys: Path,
                                                       fork_server: str) -> None:
    group: HAGroup = ha_factory("failover", ["hsmA", "hsmB"],
                                daemon_extra=f"fork_server = {fork_server}\n")
    app = _app(group, ha_keys)
    try:
        assert app.run("_ = signs()") == "True"
        helper = group.app_helper(app.proc.pid, "hsmA")
        forked = _parent(helper) != group.daemon.pid
        assert forked == (fork_server == "true")
        assert len(fork_server_pids(group.daemon.pid)) == (2 if forked else 0)
        # a process group of its own in the daemon's session, either way
        assert (os.getpgid(helper), os.getsid(helper)) == (helper, os.getsid(group.daemon.pid))
    finally:
        app.close()


async def test_a_helper_that_said_it_outlives_the_daemon_does(tmp_path: Path) -> None:
    """ADOPTABLE is answered once the forked helper no longer dies with its fork server
    (the helper's main thread clears PR_SET_PDEATHSIG): a daemon that stops right after
    the answer (a keeper, Resume.keepers) kills its fork servers at once, and the helper
    stays. Repeated on a busy machine, where the main thread is the last to run (CI saw
    the keeper die before the fix: 2 of 30 here)."""
    from p11p.daemon import forkserver
    from p11p.daemon.helperproc import HelperProcess
    hsm = SoftHSM(tmp_path / "hsm")
    hsm.init_token("outlive")
    HelperProcess.adopt_wait = 10.0
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    app = subprocess.Popen(["sleep", "120"])  # the application the helpers serve
    died, started = [], []
    try:
        for _ in range(15):
            helper = await HelperProcess.start("outlive", str(SOFTHSM_SO), hsm.env, 1 << 20)
            started.append(helper.pid)
            helper.make_adoptable(app.pid, secrets.token_bytes(32))
            assert await helper.outlives(5.0)
            helper.leave()
            forkserver.abandon_all()
            await asyncio.sleep(0.2)
            if not _alive(helper.pid):
                died.append(helper.pid)
        assert not died, f"{len(died)} of 15 helpers died with their fork server"
    finally:
        for proc in [*busy, app]:
            proc.kill()
            proc.wait()
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        HelperProcess.adopt_wait = 0.0
