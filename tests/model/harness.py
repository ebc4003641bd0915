"""The differential harness: the same steps through p11p and on one SoftHSM2 token used
directly, every result compared.

Two applications (two processes each side, tests/model/worker.py) run the steps of a
sequence; member events (faultsim rules, helper kills, hangs, drain/enable, recovery) go
to p11p's members between the steps. A step is a plain dict, so a failing sequence
prints as a list of dicts and replays as one (test_model.py keeps the shrunk ones).

Every CK_RV must be equal, every deterministic output equal, every random output
verified. The differences p11p documents are allowed in one place only: `Documented`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "ha"))
from hakit import HAGroup, ha_softhsm, make_keys, repair_token_files, token_files  # noqa: E402
from kit import CLIENT_SO, SOFTHSM_SO, USER_PIN, SoftHSM, helper_pids  # noqa: E402
from p11p.protocol.constants import CKR, RV_NAMES  # noqa: E402

OK = CKR["CKR_OK"]
HANDLE_INVALID = {CKR[c] for c in ("CKR_OBJECT_HANDLE_INVALID", "CKR_KEY_HANDLE_INVALID",
                                   "CKR_WRAPPING_KEY_HANDLE_INVALID",
                                   "CKR_UNWRAPPING_KEY_HANDLE_INVALID")}
# what the worker names an attribute of a found object it cannot read, the object gone
UNREADABLE = f"?{CKR['CKR_OBJECT_HANDLE_INVALID']:#x}"
REF_TOKEN = "ref"
MEMBERS = ("hsmA", "hsmB", "hsmC")
APPS = 2
REPLY_TIMEOUT = 30.0
# attributes whose value is key material: random for generated keys
MATERIAL = {"CKA_VALUE", "CKA_EC_POINT", "CKA_MODULUS", "CKA_PUBLIC_EXPONENT", "CKA_CHECK_VALUE"}
NONDET_MECHS = {"CKM_ECDSA"}
# steps that move a session's operation or search along or end it: written to the state
# file lazily (KILL_WINDOW); an init's reply waits for it (daemon/resume.py MOVES)
PROGRESS_STEPS = {"update", "final", "oneshot", "digestkey", "find", "find_final"}
KILL_WINDOW = 0.1 + 0.05  # daemon/resume.py LAZY_MAX, and the reply's way to the harness
MEMBER_FAILED_RVS = {"CKR_DEVICE_ERROR", "CKR_DEVICE_REMOVED", "CKR_DEVICE_MEMORY",
                     "CKR_TOKEN_NOT_PRESENT"}


class Discrepancy(AssertionError):
    """p11p and the token used directly disagree (or p11p broke a stated bound)."""

    signature = ""  # what a shrunk sequence must still show: the check, the call, the codes


class HarnessError(RuntimeError):
    """The harness itself failed: not a finding about p11p."""


def rv_name(rv: Any) -> str:
    return RV_NAMES.get(rv, hex(rv)) if isinstance(rv, int) else str(rv)


# -- worker processes -------------------------------------------------------------------

class WorkerProc:
    """One application process (worker.py) on one module."""

    def __init__(self, module: Path, label: str, env: dict[str, str], name: str) -> None:
        self.module, self.label, self.env, self.name = module, label, env, name
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker.py"), str(self.module), self.label],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **self.env})
        self.pid = int(json.loads(self._readline(30.0))["ready"])

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"{self.name}: no reply within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise HarnessError(f"{self.name}: the worker exited with {self.proc.wait()}")
        return line

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(self._readline(timeout))
        if "crash" in reply:
            raise HarnessError(f"{self.name}: {reply['crash']}")
        return reply

    def call(self, cmd: dict[str, Any], timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        self.send(cmd)
        return self.recv(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write('{"op": "quit"}\n')
                proc.stdin.flush()
                proc.wait(5)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                proc.kill()
                proc.wait()


# -- the environment: tokens, a daemon, the applications ---------------------------------

def make_tokens(root: Path) -> tuple[SoftHSM, Path]:
    """The members hsmA..hsmC and the reference token, holding the same imported keys
    (each token's first token.object kept: hakit.repair_token_files)."""
    keys = make_keys(root / "keys.json")
    return ha_softhsm(root / "softhsm", keys, (*MEMBERS, REF_TOKEN)), keys


class Env:
    """A p11p group of members behind the fault module, two applications on it, and
    their twins on the reference token."""

    def __init__(self, root: Path, hsm: SoftHSM, keys: Path, policy: str, members: int,
                 data_plane: bool | None = None) -> None:
        self.policy = policy
        # the data plane (README "Data plane") on or off for the whole run; unset: from
        # P11P_MODEL_DATA_PLANE ("0": off), on by default. Both ways must agree with the
        # token used directly.
        if data_plane is None:
            data_plane = os.environ.get("P11P_MODEL_DATA_PLANE", "1") != "0"
        self.data_plane = data_plane
        self.members = list(MEMBERS[:members])
        self.hsm = hsm  # make_tokens kept each token's first token.object in hsm.root
        self.token_dirs = token_files(hsm, (*MEMBERS, REF_TOKEN))
        self.repairs = 0
        self.keys = json.loads(keys.read_text())
        # the harness removes the token objects a sequence made behind p11p's back (on
        # the tokens directly); such writes show within object_cache_ttl (README), so
        # it is short here and the reset waits it out
        self.object_cache_ttl = 0.5
        plane = "" if data_plane else "\ndirect_calls = false"
        self.group = HAGroup(root, hsm, policy, self.members,
                             extra=f"object_cache_ttl = {self.object_cache_ttl}{plane}")
        self.group.daemon.start()
        self.call_timeout, self.hold_timeout = 1.5, 2.0  # HAGroup's
        # off: the client library opens no session itself either (P11P_CLIENT_OPEN)
        app_env = {**self.group.daemon.env, **({} if data_plane else {"P11P_CLIENT_OPEN": "0"})}
        self.p11p = [WorkerProc(CLIENT_SO, "ha", app_env, f"p11p-app{i}") for i in range(APPS)]
        self.ref = [WorkerProc(SOFTHSM_SO, REF_TOKEN, hsm.env, f"ref-app{i}")
                    for i in range(APPS)]
        self.serial = 0
        self.hang_timers: list[threading.Timer] = []
        self.rules: dict[str, list[str]] = {m: [] for m in self.members}

    def close(self) -> None:
        for t in self.hang_timers:
            t.cancel()
        for w in self.p11p + self.ref:
            w.stop()
        self.group.daemon.stop()

    # -- member events --------------------------------------------------------------------

    def write_rules(self, member: str) -> None:
        # `procs=1` rules count their processes in files beside the rules: a new rule
        # counts again
        for f in self.group.rules[member].parent.glob(f"{member}.rules.procs-*"):
            f.unlink(missing_ok=True)
        self.group.set_rules(member, "".join(line + "\n" for line in self.rules[member]))

    def admin(self, cmd: str, member: str) -> dict[str, Any]:
        from p11p.daemon.cli import admin_request
        path = self.group.daemon.socket.with_name(self.group.daemon.socket.name + ".admin")
        return admin_request(path, {"cmd": cmd, "group": "ha", "member": member}, timeout=30)

    def states(self) -> dict[str, str]:
        (g,) = self.group.status()["groups"]
        return {m["name"]: m["state"] for m in g["members"]}

    def wait_all_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        repair_at = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            states = self.states()
            if all(s == "OK" for s in states.values()):
                return
            if time.monotonic() > repair_at:
                repair_at = deadline
                self.repair_tokens([m for m, s in states.items() if s != "OK"])
            time.sleep(0.05)
        raise HarnessError(f"members not back in service after {timeout}s: {self.states()}")

    def repair_tokens(self, members: list[str]) -> None:
        """A member's token.object damaged by a helper killed mid-write is put back
        (hakit.repair_token_files; counted in `repairs`)."""
        self.repairs += len(repair_token_files(
            self.hsm, {m: p for m, p in self.token_dirs.items() if m in members}))

    def clear_faults(self) -> None:
        for t in self.hang_timers:
            t.cancel()
        self.hang_timers.clear()
        for m in self.members:
            self.rules[m] = []
            self.write_rules(m)
            if self.states().get(m) in ("DRAINING", "DISABLED", "DRAINED"):
                self.admin("enable", m)

    def unique(self) -> str:
        """An option that makes a rule's line new, so faultsim starts its counters again."""
        self.serial += 1
        return f"after={'0' * (self.serial % 16 + 1)}"

    def event(self, ev: dict[str, Any]) -> None:
        kind, m = ev["ev"], ev.get("m", "")
        if kind == "error":
            # the member's next call(s), in one process (faultsim counts per process)
            self.rules[m] = [f"{ev['fn']} error rv={ev['rv']} count={ev['count']} procs=1 "
                             f"{self.unique()}"]
            self.write_rules(m)
        elif kind == "down":
            self.rules[m] = [f"* error rv=CKR_DEVICE_ERROR {self.unique()}"]
            self.write_rules(m)
        elif kind == "up":
            self.rules[m] = []
            self.write_rules(m)
        elif kind == "reset":
            self.rules[m] = [f"* close-sessions {self.unique()}"]
            self.write_rules(m)
        elif kind == "hang":
            line = f"{ev.get('fn', '*')} hang {self.unique()}"
            self.rules[m] = [line]
            self.write_rules(m)

            def unhang(member: str = m, line: str = line) -> None:
                if line in self.rules[member]:
                    self.rules[member].remove(line)
                    self.write_rules(member)
            t = threading.Timer(self.call_timeout + 0.5, unhang)
            t.daemon = True
            t.start()
            self.hang_timers.append(t)
        elif kind == "kill":
            pid = self.app_helper(self.p11p[ev["app"]].pid, m)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                # the daemon fails the member when it reaps the helper, and ends the
                # other applications' helpers there: a token write sent before that may
                # be cut mid-way on that member, which keeps a copy (README, Limits: "a
                # token object write whose member fails after making the object"; on
                # SoftHSM2 a copy with the source's label, or a truncated file). The
                # model sends its next call once the daemon has seen the kill
                deadline = time.monotonic() + 5
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(0.05)
        elif kind == "restart":
            # the daemon stopped (SIGTERM) or killed and started again: the applications'
            # helpers wait for it and it takes them back (daemon/resume.py)
            self.group.daemon.restart(signal.SIGKILL if ev.get("how") == "kill"
                                      else signal.SIGTERM)
        elif kind in ("drain", "enable"):
            reply = self.admin(kind, m)
            if "error" in reply:
                raise HarnessError(f"{kind} {m}: {reply}")
        elif kind == "settle":
            self.settle(set(ev.get("exempt", [])))
        else:
            raise HarnessError(f"unknown event {ev}")

    def settle(self, exempt: set[str], timeout: float = 20.0) -> None:
        """Waits until every member but `exempt` (held out on purpose) is in service."""
        for t in self.hang_timers:
            t.join(10)
        deadline = time.monotonic() + timeout
        repair_at = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            states = self.states()
            if all(s == "OK" or m in exempt for m, s in states.items()):
                return
            if time.monotonic() > repair_at:  # as wait_all_ok: a helper killed mid-write
                repair_at = deadline
                self.repair_tokens([m for m, s in states.items() if s != "OK" and m not in exempt])
            time.sleep(0.05)
        raise HarnessError(f"members not recovered after {timeout}s: {self.states()}")

    def app_helper(self, app_pid: int, member: str) -> int | None:
        import re
        # its latest context's (a helper may have served another application before: the
        # daemon recycles them)
        text = self.group.daemon.log_text()
        ctxs = re.findall(rf"ctx=(\w+) pid={app_pid} started", text)
        if not ctxs:
            return None
        found = re.findall(rf"ctx={ctxs[-1]} pid={app_pid} member={member} helper pid=(\d+)",
                           text)
        # a daemon restarted took back the helpers of the one before (not its children)
        alive = set(helper_pids(self.group.daemon.pid)) | {
            p for p in self.group.daemon.helpers if Path(f"/proc/{p}").exists()}
        for pid in reversed([int(p) for p in found]):
            if pid in alive:
                return pid
        return None


# -- the model ------------------------------------------------------------------------

@dataclass
class Obj:
    kind: str              # data, aes, hmac, ecpub, rsapub, ecpriv, rsapriv, gaes, gecpub, gecpriv
    token: bool
    owner: str | None      # the session that made a session object
    random: bool = False   # made from random material (generated, or from such a key)
    used: bool = False
    app: int = 0
    private: bool = True   # CKA_PRIVATE (the model takes true unless a template says false)
    found: bool = False    # this handle came from a search (not from the call that made it)
    copied: bool = False   # made by C_CopyObject
    # the generated keys whose bits it carries (itself, a copy's or derivation's sources):
    # once one of them is used, none of them can be made again (p11p's recipe roots)
    roots: frozenset[str] = frozenset()


@dataclass
class Session:
    rw: bool
    ops: dict[str, str] = field(default_factory=dict)  # fn -> key name ('' for digest)
    last: dict[str, tuple[str, str]] = field(default_factory=dict)  # fn -> last init's key, mech
    finding: bool = False
    find_stale: bool = False  # its search began before a logout (its handles are stale)
    diverged: bool = False  # a documented difference happened on it: only closed from now
    refused_end: bool = False  # a failed part ended an operation (the token may keep it)


IMPORTED = {  # name a find gives an imported object -> kind
    "3/ha-ec//T": "ecpriv", "3/ha-rsa//T": "rsapriv", "4/ha-aes//T": "haes",
    "4/ha-kek//T": "kek", "0/ha-secret//T": "secret",
    **{f"0/ha-find/find-{i}/T": "find" for i in range(6)},
}


class Documented:
    """The differences between p11p and the token used directly that p11p documents:
    the only ones this harness lets pass. Each names the text that documents it."""

    @staticmethod
    def unreplayable_session_state(runner: Runner, app: int, step: dict[str, Any],
                                   p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README "What it is": p11p "replays operation state when a member fails";
        DESIGN.md "Failure handling", Replay: session objects are rebuilt from their
        recipes, "a generated key only until it has been used", and "what cannot be
        replayed marks the session unrecoverable" (the call gets CKR_DEVICE_ERROR,
        router: "session state lost"). Allowed only on a session that holds a used
        object made of random material when a member event happened since its use."""
        if p.get("rv") != CKR["CKR_DEVICE_ERROR"] or r.get("rv") == p.get("rv"):
            return False
        s = step.get("s")
        tainted = runner.tainted[app]
        names = {step.get(k) for k in ("k", "wk", "uk", "base", "src", "o")}
        sess = runner.sessions[app].get(s or "")
        if sess is not None:  # the keys of its operations (replayed where it goes)
            names |= set(sess.ops.values())
        # an object the model dropped already (diverge: its session was tainted) counts
        known = (runner.objs[app].get(n or "") or runner.made.get(n or "") for n in names)
        owners = {o.owner for o in known if o is not None}
        return s in tainted or bool(owners & tainted)


    @staticmethod
    def general_error_with_no_other_member(runner: Runner, app: int, step: dict[str, Any],
                                           p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, Limits: "CKR_GENERAL_ERROR fails it only when its token no longer
        answers C_GetTokenInfo [...] The call is then tried on another member; with none
        left, the application gets the code." Allowed while a CKR_GENERAL_ERROR rule was
        put on a member (since the last settle) and fewer than two members serve."""
        if p.get("rv") != CKR["CKR_GENERAL_ERROR"] or not runner.general_errors:
            return False
        # a member under a member-failed code rule may be out of service (failed, and
        # recovering) when the call looks for another
        failing = {m for m, lines in runner.env.rules.items()
                   if any(f"rv={rv} " in line for rv in MEMBER_FAILED_RVS for line in lines)}
        # and one whose helper was killed fails when p11p learns of it, then recovers
        serving = [m for m in runner.env.members
                   if m not in runner.out_of_service() and m not in failing
                   and m not in runner.killed]
        # README: a session key generated at random stays on the member that made it
        # while that member serves: a call that needs it (or names it: attributes,
        # destroy) has no other member
        names = {step.get(k) for k in ("k", "wk", "uk", "base", "src", "o")}
        held = [runner.objs[app][n] for n in names if n in runner.objs[app]]
        # README: nor is a session moved that holds what cannot be made again (a used
        # generated key, an operation p11p does not replay): it stays where it is
        sess = runner.sessions[app].get(step.get("s", ""))
        stuck = sess is not None and (bool(sess.ops) or any(
            o.owner == step.get("s") and o.random and o.used for o in runner.objs[app].values()))
        # and every member that serves may give it (a rule put on each: "with none left")
        everywhere = all(any("rv=CKR_GENERAL_ERROR" in line for line in runner.env.rules[m])
                         for m in serving)
        return (len(serving) < 2 or stuck or everywhere
                or any(o.random and not o.token for o in held))

    @staticmethod
    def a_hang_and_another_failure(runner: Runner, app: int, step: dict[str, Any],
                                   p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, Limits: "A call that meets a hung member spends two thirds of
        call_timeout there [...]; when it meets a failing member too (before or after the
        hung one [...]), it may end with CKR_DEVICE_ERROR." Allowed while a member is
        hung and a member-failed code rule was put on another (an error or down event), a
        helper killed, or another member hung (since the last settle)."""
        return (p.get("rv") == CKR["CKR_DEVICE_ERROR"] and bool(runner.hung)
                and (runner.failing_errors or len(runner.hung) > 1))

    @staticmethod
    def operation_kept_after_a_refused_end(runner: Runner, app: int, step: dict[str, Any],
                                           p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, Limits: "a call that continues or ends an operation and fails ends it
        (PKCS#11 §5.2) [...] SoftHSM2 keeps [...]". Allowed in a session where a refused
        part ended an operation: where the token used directly answers an init
        CKR_OPERATION_ACTIVE, or a call of that operation from the one it kept while
        p11p answers CKR_OPERATION_NOT_INITIALIZED."""
        sess = runner.sessions[app].get(step.get("s", ""))
        if sess is None or not sess.refused_end:
            return False
        if r.get("rv") == CKR["CKR_OPERATION_ACTIVE"]:
            return True
        return (p.get("rv") == CKR["CKR_OPERATION_NOT_INITIALIZED"]
                and step["op"] in ("update", "final", "oneshot")
                and step.get("fn") not in sess.ops)


    @staticmethod
    def lost_operation_beside(runner: Runner, app: int, step: dict[str, Any],
                              p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, Limits: "an operation that cannot be replayed [...] answers
        CKR_DEVICE_ERROR at its next call and is over. The session and everything else in
        it go on": the member session it went to has no such operation, so another
        operation or a search starts there, where SoftHSM2 used directly answers
        CKR_OPERATION_ACTIVE. Allowed for an init in a session that may have lost state
        (as unreplayable_session_state) while an operation is active in it."""
        sess = runner.sessions[app].get(step.get("s", ""))
        if sess is None:
            return False
        # its operations' keys: one made in another session that may have lost it
        owners = {o.owner for o in (runner.made.get(k) for k in sess.ops.values()) if o}
        return (r.get("rv") == CKR["CKR_OPERATION_ACTIVE"] and p.get("rv") == OK
                and step["op"] in ("opinit", "find_init") and bool(sess.ops)
                and (step.get("s") in runner.tainted[app] or bool(owners & runner.tainted[app])))

    @staticmethod
    def home_out_of_service(runner: Runner, app: int, step: dict[str, Any],
                            p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, Limits: under write_policy "primary" a token object written through
        p11p, and a session object made from it (also after the token object is
        destroyed), "can be used only while that one member serves: while it is out of
        service, calls that name them are held up to hold_timeout, then answered
        CKR_DEVICE_ERROR"; and "An operation's call needs the keys of the session's other
        active operations too". Allowed where the call needs such an object (named, or
        for an operation's call an active operation's key, destroyed since or not) while
        its member is out of service (the generator keeps faults off that member: a
        shrunk replay may not)."""
        if p.get("rv") != CKR["CKR_DEVICE_ERROR"] or r.get("rv") == p.get("rv"):
            return False
        names = {step.get(k) for k in ("k", "wk", "uk", "base", "src", "o")}
        sess = runner.sessions[app].get(step.get("s", ""))
        if sess is not None and step["op"] in ("opinit", "update", "final", "oneshot",
                                               "digestkey"):
            names |= set(sess.ops.values())
        out = runner.out_of_service()
        return any((runner.homes.get(n) or runner.home_made.get(n)) in out
                   for n in names if n)

    @staticmethod
    def search_in_progress(runner: Runner, app: int, step: dict[str, Any],
                           p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, Limits: "A search is answered by p11p [...] while one is in progress in
        a session, an operation may still start there, and an unknown key handle is
        answered as such; SoftHSM2 used directly answers CKR_OPERATION_ACTIVE in both
        cases." Allowed for an operation's init in a session with a search open."""
        sess = runner.sessions[app].get(step.get("s", ""))
        return (r.get("rv") == CKR["CKR_OPERATION_ACTIVE"] and step["op"] == "opinit"
                and sess is not None and sess.finding)

    @staticmethod
    def operation_end_lost_in_a_kill(runner: Runner, app: int, step: dict[str, Any],
                                     p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, "What still needs care after a restart": an operation's end is written
        to the state file within 10 ms after its reply, "and a kill in that window loses
        them": an operation that ended just before a SIGKILL is still active for the
        daemon that takes over, which answers an init naming a handle the application was
        never given CKR_OPERATION_ACTIVE (its own check first, as unknown_handle_first)
        where SoftHSM2, with no operation, answers the handle's code. (An init naming a
        key it gave goes to the member, which has no operation: CKR_OK.) Allowed for such
        an init in a session whose operation moved within that window before a kill."""
        named = [step.get(k) for k in ("k", "wk", "uk", "base")]
        return (p.get("rv") == CKR["CKR_OPERATION_ACTIVE"] and step["op"] == "opinit"
                and r.get("rv") in HANDLE_INVALID and step.get("s") in runner.unsure[app]
                and ("gone" in named or any(n in runner.stale[app] for n in named if n)))

    @staticmethod
    def unknown_handle_first(runner: Runner, app: int, step: dict[str, Any],
                             p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, Limits: "A handle the application was never given [...] is answered
        by p11p [...] before the token's own checks: an operation's init naming one while
        another operation is active in the session gets that code where SoftHSM2 answers
        CKR_OPERATION_ACTIVE". Allowed for an init naming "gone", or a handle a logout
        ended (a private object's: p11p forgets it, as the token's handles end), in a
        session with an operation active (failover-98: the operation went with its
        member, so p11p's daemon no longer answers CKR_OPERATION_ACTIVE first)."""
        sess = runner.sessions[app].get(step.get("s", ""))
        named = [step.get(k) for k in ("k", "wk", "uk", "base")]
        return (r.get("rv") == CKR["CKR_OPERATION_ACTIVE"] and step["op"] == "opinit"
                and p.get("rv") in HANDLE_INVALID and sess is not None and bool(sess.ops)
                and ("gone" in named or any(n in runner.stale[app] for n in named if n)))

    @staticmethod
    def objects_on_different_members(runner: Runner, app: int, step: dict[str, Any],
                                     p: dict[str, Any], r: dict[str, Any]) -> bool:
        """README, Limits: "A call that needs two objects each of which only one member
        holds [...] and not the same one, has no member to run on: it gets the handle's
        CKR_*_HANDLE_INVALID". Allowed where the call (a call of an operation: with its
        session's operations) needs two such objects: session objects made at random, or
        token objects written through p11p to one member. A call of no operation (copy,
        destroy, attributes, wrap, unwrap, derive) needs only what it names: it runs on a
        member that holds that, beside the session's operations."""
        if p.get("rv") not in HANDLE_INVALID or r.get("rv") == p.get("rv"):
            return False
        sess = runner.sessions[app].get(step.get("s", ""))
        names = {step.get(k) for k in ("k", "wk", "uk", "base", "src", "o")}
        if sess is not None and step["op"] in ("opinit", "update", "final", "oneshot",
                                               "digestkey"):
            names |= set(sess.ops.values())
        pinned = set()
        for name in names:
            obj = runner.made.get(name or "")
            if obj is not None and obj.random and not obj.token:
                pinned.add(min(obj.roots) if obj.roots else name)
            elif name in runner.homes:
                pinned.add(name)
        return len(pinned) >= 2

    @staticmethod
    def lost_session_objects(runner: Runner, app: int) -> set[str]:
        """README, Limits: a session object that cannot be remade on the new member
        "answers CKR_DEVICE_ERROR whenever it is named [...]; searches no longer find
        it". The session objects of sessions that may have lost state (as
        unreplayable_session_state): a search may miss them."""
        return runner.lost[app] | {n for n, o in runner.objs[app].items()
                                   if o.owner in runner.tainted[app]}

    @staticmethod
    def made_again_beside_itself(runner: Runner, found: list[str]) -> list[str]:
        """README, Limits: "A module that answers so for a session object it still holds
        (to the call, and to p11p's check after it) has p11p make the object again
        beside it: a search then finds both." Allowed while such a rule was put (on
        C_GetAttributeValue, twice: the call's and p11p's check): a session object
        found twice counts once. Returns `found` so."""
        if not runner.handle_lies:
            return found
        out: list[str] = []
        for name in found:
            if name in out and name.startswith("m-"):
                runner.allowed += 1
                continue
            out.append(name)
        return out

    @staticmethod
    def token_objects_of_the_other_application(runner: Runner, app: int) -> set[str]:
        """Not p11p's difference but the reference's: SoftHSM2 used directly by two
        processes shows one process a token object the other just made only once its
        object store is read again (seen for private keys). Through p11p the object is
        found (PKCS#11: token objects are every application's). A search through p11p
        may find such objects where the reference does not. The other application's
        handle to one may have gone apart (found again on one side only: the model
        names it no more there); the object is still the token's (balance-104)."""
        other = 1 - app
        mine = {n for n, o in runner.objs[other].items() if o.token and o.app == other}
        return mine | {n for n in runner.apart[other]
                       if (o := runner.made.get(n)) is not None and o.token and o.app == other}

    @staticmethod
    def token_object_on_one_member(runner: Runner, app: int, s: str, p11p: list[str],
                                   direct: list[str]) -> list[str]:
        """README, Configuration: write_policy = "primary" writes a token object in a
        group of several members to one member ("Limits worth knowing": token object
        writes follow write_policy), so a search served by another member does not see
        it; nor one destroyed since the search began (p11p's result is the member's at
        C_FindObjectsInit, the token's result keeps it too). Returns the direct result
        without such objects that p11p did not find. One the application never had a
        handle to and that was destroyed before the batch that returned it has no name
        on the token's side: each of its attributes CKR_OBJECT_HANDLE_INVALID; such
        entries go too, as many as homed objects were destroyed (balance-90)."""
        homed = runner.homed(app, s)
        missing = [n for n in direct if n in homed and n not in p11p]
        gone = sum(1 for n in homed if not any(n in objs for objs in runner.objs))
        nameless = [n for n in direct if n not in p11p and set(n.split("/")) == {UNREADABLE}]
        missing += nameless[:gone]
        if missing:
            runner.allowed += 1
        return [n for n in direct if n not in missing]


class Runner:
    """Runs steps on both sides and compares them; keeps the model the generator asks."""

    def __init__(self, env: Env, verbose: bool = False) -> None:
        self.env = env
        self.verbose = verbose
        self.log: list[dict[str, Any]] = []
        self.calls = 0
        self.examples = -1
        self.counter = int(time.time() * 1000) % 10**9 * 100
        self.failure: tuple[list[dict[str, Any]], Discrepancy] | None = None
        self.kinds: Counter[str] = Counter()
        self.reset(first=True)

    # -- between examples -----------------------------------------------------------------

    def reset(self, first: bool = False) -> None:
        env = self.env
        self.examples += 1
        env.clear_faults()
        env.wait_all_ok()
        made_token_objects = first or getattr(self, "token_made", False)
        for w in env.p11p + env.ref:
            try:
                w.call({"op": "finalize"}, timeout=10)  # CKR_CRYPTOKI_NOT_INITIALIZED is fine
            except (TimeoutError, HarnessError):
                w.restart()
        if made_token_objects:
            env.ref[0].call({"op": "init"})
            cleaned = env.ref[0].call({"op": "cleanup", "pin": USER_PIN})
            env.ref[0].call({"op": "finalize"})
            if cleaned["damaged"]:
                env.repairs += cleaned["damaged"]
                print(f"harness: {cleaned['damaged']} SoftHSM2 object file(s) truncated by a "
                      "kill mid-write; destroyed", flush=True)
            if cleaned["destroyed"]:
                time.sleep(env.object_cache_ttl + 0.1)
        for w in env.p11p + env.ref:
            reply = w.call({"op": "init"})
            if reply["rv"] != OK or not reply["slot_found"]:
                raise HarnessError(f"{w.name}: C_Initialize {reply}")
        self.sessions: list[dict[str, Session]] = [{} for _ in range(APPS)]
        self.objs: list[dict[str, Obj]] = [{} for _ in range(APPS)]
        self.logged_in = [False] * APPS
        self.values: dict[str, tuple[Any, Any, dict[str, Any]]] = {}  # id -> (p11p, ref, meta)
        self.finds: dict[tuple[int, str], tuple[list[str], list[str]]] = {}
        self.tainted: list[set[str]] = [set() for _ in range(APPS)]
        # when each session's operation or search last moved (its reply), for a kill; the
        # sessions where a kill came within the window (their state file may be behind)
        self.moved_at: list[dict[str, float]] = [{} for _ in range(APPS)]
        self.unsure: list[set[str]] = [set() for _ in range(APPS)]
        self.lost: list[set[str]] = [set() for _ in range(APPS)]  # Documented lost
        self.apart: list[set[str]] = [set() for _ in range(APPS)]  # handles that differ
        # objects p11p still has that the token used directly destroyed: a destroy refused
        # through p11p in a documented way (destroyed_by_the_token_only)
        self.extra: list[set[str]] = [set() for _ in range(APPS)]
        # handles of private objects the application had when it was logged out (the
        # token direct makes them invalid; a find after login gives new ones)
        self.stale: list[set[str]] = [set() for _ in range(APPS)]
        self.homes: dict[str, str] = {}   # token object made through p11p -> its member
        # a search's session -> the token objects on one member when the search began
        self.homed_at_init: dict[tuple[int, str], set[str]] = {}
        # a session object made from such a token object (copy, derive, unwrap) -> that
        # member: remade elsewhere it needs its source there, destroyed or not
        self.home_made: dict[str, str] = {}
        self.down: set[str] = set()       # members a persistent error holds out
        self.hung: set[str] = set()       # members hung (until a settle)
        # members with a helper killed (until a settle): p11p fails the member when it
        # learns of the death, which a call right after may beat
        self.killed: set[str] = set()
        self.general_errors = False       # a CKR_GENERAL_ERROR rule put (until a settle)
        self.failing_errors = False       # a member-failed code rule put (until a settle)
        # a CKR_OBJECT_HANDLE_INVALID rule on C_GetAttributeValue that answers p11p's
        # check after the call too: a session object may be made again beside itself
        self.handle_lies = False
        self.allowed = 0                  # steps a Documented difference let pass
        self.drained: set[str] = set()
        self.events = 0
        self.token_made = False
        # names (and so labels) are not used again in the daemon's life: an earlier
        # sequence's object, removed behind p11p's back, never meets a new one
        self.made: dict[str, Obj] = {}  # every object the model made, by name
        self.log = []

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # -- one step ------------------------------------------------------------------------

    def run(self, step: dict[str, Any]) -> None:
        self.log.append(step)
        self.kinds[step.get("ev") or step["op"]] += 1
        if self.verbose:
            print("  step", json.dumps(step), flush=True)
        if "ev" in step:
            self.apply_event(step)
            return
        app = step["app"]
        cmd = {k: v for k, v in step.items() if k not in ("app", "id")}
        pcmd, rcmd = self.resolve(cmd, 0), self.resolve(cmd, 1)
        homeless = False
        if step["op"] in ("create", "genkey", "genpair", "copy", "unwrap", "derive") \
                and self.is_token_write(step):
            homeless = not self.note_home(step)
        start = time.monotonic()
        self.env.p11p[app].send(pcmd)
        self.env.ref[app].send(rcmd)
        try:
            p = self.env.p11p[app].recv()
        except TimeoutError:
            self.env.p11p[app].restart()
            self.env.p11p[app].call({"op": "init"})
            raise Discrepancy(f"p11p gave no reply within {REPLY_TIMEOUT}s") from None
        took = time.monotonic() - start
        if step["op"] in PROGRESS_STEPS:
            self.moved_at[app][step["s"]] = time.monotonic()
        r = self.env.ref[app].recv()
        if self.verbose:
            print("    p11p", self.show(p), " direct", self.show(r), flush=True)
        self.calls += 1
        if homeless and not self.note_home(step):
            # no member was in service before or after (p11p held the write until one
            # was, or a draining one took it): on one member, which is not known
            for name in (step.get("o"), step.get("pub"), step.get("priv")):
                if name:
                    self.homes[name] = "?"
        self.compare(app, step, p, r, took)
        self.update(app, step, p, r)

    def resolve(self, cmd: dict[str, Any], side: int) -> dict[str, Any]:
        """Data a step takes from an earlier output: each side its own."""
        out = dict(cmd)
        for k, v in cmd.items():
            if isinstance(v, dict) and "ref" in v:
                raw = bytes.fromhex(self.values[v["ref"]][side])
                if v.get("flip") and raw:
                    raw = bytes([raw[0] ^ 1]) + raw[1:]
                out[k] = raw.hex()
        return out

    def is_token_write(self, step: dict[str, Any]) -> bool:
        templates = [step.get("t") or [], step.get("priv_t") or [], step.get("pub_t") or []]
        if any(["CKA_TOKEN", True] in t for t in templates):
            return True
        if step["op"] == "copy":
            src = self.objs[step["app"]].get(step["src"])
            return bool(src and src.token) and ["CKA_TOKEN", False] not in step["t"]
        return False

    def note_home(self, step: dict[str, Any]) -> bool:
        """A token object written through p11p lives on one member (write_policy
        "primary", README): the model keeps faults away from that member, and withdraws
        the error rules that still wait (README, Limits: a member that fails after making
        the object, before p11p read back what it made, may keep a copy). On every member
        not held down: the one in service first now may not be the first when the call
        comes (another returns to service meanwhile), and a member the model still counts
        as hung may be in service (its hang ends by itself). A hang or a down rule acts
        before the token sees the call. False when no member is in service."""
        states = self.env.states()
        home = next((m for m in self.env.members if states[m] == "OK"), None)
        # what the write copies, derives or unwraps from decides where it goes: a token
        # object's member, a session object made from one; a session key made at random
        # is on the member that made it, which the model does not know ("?": no member
        # may then be hit)
        for name in (step.get(k) for k in ("src", "base", "uk")):
            obj = self.objs[step["app"]].get(name or "")
            if name in self.homes or name in self.home_made:
                home = self.homes.get(name or "") or self.home_made[name or ""]
                break
            if obj is not None and obj.random and not obj.token:
                home = "?"
                break
        for m in self.env.members:
            kept = [line for line in self.env.rules[m] if " error " not in line]
            if m not in self.down and kept != self.env.rules[m]:
                self.env.rules[m] = kept
                self.env.write_rules(m)
        for name in (step.get("o"), step.get("pub"), step.get("priv")):
            if name and home:
                self.homes[name] = home
        self.token_made = True
        return home is not None

    # -- comparing -------------------------------------------------------------------------

    def fail(self, app: int, step: dict[str, Any], p: dict[str, Any], r: dict[str, Any],
             why: str) -> None:
        exc = Discrepancy(f"{why}\n  step: {json.dumps(step)}\n  p11p:   {self.show(p)}\n"
                          f"  direct: {self.show(r)}")
        exc.signature = (f"{why.split(':')[0]} {step.get('op')} {step.get('fn', '')} "
                         f"{rv_name(p.get('rv'))} {rv_name(r.get('rv'))}")
        self.failure = (list(self.log), exc)  # hypothesis may run the example again
        raise exc

    @staticmethod
    def show(reply: dict[str, Any]) -> str:
        return json.dumps({k: (rv_name(v) if k in ("rv", "qrv", "rv2") else v)
                           for k, v in reply.items()})

    def random_inputs(self, app: int, step: dict[str, Any]) -> bool:
        keys = [step.get(k, "") for k in ("k", "wk", "uk", "base", "src")]
        sess = self.sessions[app].get(step.get("s", ""))
        if step["op"] in ("oneshot", "update", "final") and sess is not None:
            keys.append(sess.ops.get(step["fn"], ""))  # the key of the operation it goes on
            keys.append(sess.last.get(step["fn"], ("", ""))[0])
        for k in keys:
            # a key destroyed since its operation began is no longer in objs: made has it
            obj = self.objs[app].get(k) or self.made.get(k)
            if obj is not None and obj.random:
                return True
        if step.get("op") == "getattr":
            obj = self.objs[app].get(step["o"])
            return bool(obj and obj.random)
        # data taken from an earlier output that was random on one side
        return any(isinstance(v, dict) and "ref" in v and
                   self.values[v["ref"]][0] != self.values[v["ref"]][1] for v in step.values())

    def align_login(self, app: int, step: dict[str, Any], p: dict[str, Any],
                    r: dict[str, Any]) -> None:
        """After a documented difference on a login that p11p refused: the application
        is not logged in through p11p, so its twin is logged out too. Likewise a session
        p11p did not open is closed on the twin's side (its login state would outlive
        the application's last session through p11p)."""
        if step["op"] == "login" and r.get("rv") == OK and p.get("rv") != OK:
            self.env.ref[app].call({"op": "logout", "s": step["s"]})
        if step["op"] == "open" and r.get("rv") == OK and p.get("rv") != OK:
            self.env.ref[app].call({"op": "close", "s": step["s"]})

    def padding_by_chance(self, app: int, step: dict[str, Any], p: dict[str, Any],
                          r: dict[str, Any]) -> bool:
        """Not a difference: a CKM_AES_CBC_PAD decryption whose key or data differ on the
        two sides (made at random) ends in valid padding on one side by chance (1 in
        256), and SoftHSM2 answers bad padding CKR_GENERAL_ERROR."""
        sess = self.sessions[app].get(step.get("s", ""))
        mech = step.get("mech", {}).get("m") or (
            sess.last.get(step.get("fn", ""), ("", ""))[1] if sess is not None else "")
        padding = {CKR["CKR_OK"], CKR["CKR_GENERAL_ERROR"], CKR["CKR_ENCRYPTED_DATA_INVALID"]}
        return (step.get("fn") == "Decrypt" and step["op"] in ("oneshot", "update", "final")
                and mech == "CKM_AES_CBC_PAD" and self.random_inputs(app, step)
                and p.get("rv") in padding and r.get("rv") in padding)

    def compare(self, app: int, step: dict[str, Any], p: dict[str, Any], r: dict[str, Any],
                took: float) -> None:
        if self.apart[app] & {step.get(k) for k in ("o", "k", "wk", "uk", "base", "src")}:
            # a replay names an object whose handle differs on the two sides (the
            # generator names it no more)
            self.allowed += 1
            return
        diverged = self.sessions[app].get(step.get("s", ""))
        if diverged is not None and diverged.diverged and step["op"] != "close":
            # a documented difference left the two sides' session states apart: its
            # results are not comparable any more (the generator only closes it; a
            # shrunk replay may not)
            return
        limit = self.env.call_timeout + self.env.hold_timeout + 1.0
        if took > limit:
            self.fail(app, step, p, r, f"the call took {took:.1f}s (call_timeout "
                      f"{self.env.call_timeout}s, hold_timeout {self.env.hold_timeout}s)")
        for key in ("rv", "qrv", "rv2"):
            if p.get(key) != r.get(key):
                if key == "rv" and Documented.unreplayable_session_state(self, app, step, p, r):
                    self.diverge(app, step["s"])
                    self.made_by_the_token_only(app, step, r)
                    return
                if key == "rv" and Documented.general_error_with_no_other_member(
                        self, app, step, p, r):
                    if step["op"] in ("find_init", "opinit", "update") and r.get("rv") == OK:
                        # begun or continued on the token, refused through p11p
                        self.diverge(app, step["s"])
                        return
                    self.allowed += 1
                    self.made_by_the_token_only(app, step, r)
                    self.destroyed_by_the_token_only(app, step, p, r)
                    self.align_login(app, step, p, r)
                    return
                if key in ("rv", "qrv") and Documented.a_hang_and_another_failure(
                        self, app, step, p, r):
                    self.destroyed_by_the_token_only(app, step, p, r)
                    self.diverge(app, step["s"])  # what the call did on the token is unknown
                    self.made_by_the_token_only(app, step, r)
                    self.align_login(app, step, p, r)
                    return
                if key == "rv" and self.padding_by_chance(app, step, p, r):
                    self.allowed += 1
                    return
                if key == "rv" and Documented.operation_kept_after_a_refused_end(
                        self, app, step, p, r):
                    self.diverge(app, step["s"])
                    return
                if key == "rv" and Documented.home_out_of_service(self, app, step, p, r):
                    self.diverge(app, step["s"])  # begun or continued on the token only
                    self.made_by_the_token_only(app, step, r)
                    return
                if key == "rv" and Documented.lost_operation_beside(self, app, step, p, r):
                    self.diverge(app, step["s"])  # the lost operation is over on p11p's side
                    return
                if key in ("rv", "qrv") and Documented.objects_on_different_members(
                        self, app, step, p, r):
                    self.diverge(app, step["s"])  # what the token made there, p11p did not
                    if step.get("o"):
                        self.lost[app].add(step["o"])
                    return
                if key == "rv" and (Documented.unknown_handle_first(self, app, step, p, r)
                                    or Documented.operation_end_lost_in_a_kill(
                                        self, app, step, p, r)):
                    self.allowed += 1  # nothing started on either side
                    return
                if key == "rv" and Documented.search_in_progress(self, app, step, p, r):
                    self.diverge(app, step["s"])  # an operation may run on p11p's side
                    return
                self.fail(app, step, p, r, f"{key} differs")
        op = step["op"]
        sess = self.sessions[app].get(step.get("s", ""))
        mech = step.get("mech", {}).get("m")
        if mech is None and sess is not None and "fn" in step:
            mech = sess.last.get(step["fn"], ("", ""))[1]  # the operation's mechanism
        nondet = self.random_inputs(app, step) or mech in NONDET_MECHS
        if "out" in p or "out" in r:
            po, ro = p.get("out", ""), r.get("out", "")
            if nondet:
                if len(po) != len(ro):
                    self.fail(app, step, p, r, "output lengths differ")
            elif po != ro:
                self.fail(app, step, p, r, "outputs differ")
            if step.get("mech", {}).get("m") == "CKM_ECDSA" and op in ("oneshot", "final"):
                self.check_ecdsa(app, step, p, r)
        for key in ("qlen", "state", "flags", "len", "lens"):
            if p.get(key) != r.get(key):
                if key == "qlen" and nondet:
                    continue
                self.fail(app, step, p, r, f"{key} differs")
        if "values" in p:
            for i, a in enumerate(step["a"]):
                pv, rv = p["values"][i], r["values"][i]
                if a in MATERIAL and self.random_inputs(app, step):
                    same = (pv is None) == (rv is None) and len(pv or "") == len(rv or "")
                else:
                    same = pv == rv
                if not same:
                    self.fail(app, step, p, r, f"{a} differs")
        if op == "find":
            pf, rf = p.get("found", []), r.get("found", [])
            lost = Documented.lost_session_objects(self, app)
            lost |= Documented.token_objects_of_the_other_application(self, app)
            # with objects one side may lack (documented), which a batch holds is the
            # token's order: the whole result compares once complete (below)
            if len(rf) != len(pf) and not (lost & set(rf + pf) or lost and len(pf) < len(rf)
                                           or self.homed(app, step["s"])
                                           or self.extra[app] & set(pf)
                                           or self.handle_lies):
                self.fail(app, step, p, r, "find: numbers of objects differ")
            acc = self.finds.setdefault((app, step["s"]), ([], []))
            acc[0].extend(pf)
            acc[1].extend(rf)
            # the order of a search's result is the token's (PKCS#11 sets none): the whole
            # result is compared as a set once it is complete
            if len(pf) < step["max"] and len(rf) < step["max"]:
                self.compare_found(app, step, p, r, acc)
        if op == "find_final":
            # a search ended before its result was complete (no batch shorter than asked):
            # which part each side returned is the token's order, so only the counts of
            # its batches compare (above); a complete one was compared when it completed
            self.finds.pop((app, step["s"]), None)
            self.homed_at_init.pop((app, step["s"]), None)

    def homed(self, app: int, s: str) -> set[str]:
        """The token objects written through p11p to one member, now or when the search
        of session `s` began."""
        return set(self.homes) | self.homed_at_init.get((app, s), set())

    def compare_found(self, app: int, step: dict[str, Any], p: dict[str, Any],
                      r: dict[str, Any], acc: tuple[list[str], list[str]]) -> None:
        direct = Documented.token_object_on_one_member(self, app, step["s"], acc[0], acc[1])
        lost = Documented.lost_session_objects(self, app)
        direct = [n for n in direct if n not in lost or n in acc[0]]
        other = Documented.token_objects_of_the_other_application(self, app)
        found = [n for n in acc[0] if n not in other or n in direct]
        found = [n for n in found if n not in self.extra[app]]
        found = Documented.made_again_beside_itself(self, found)
        if sorted(found) != sorted(direct):
            self.fail(app, step, p, r, f"find: results differ: p11p {sorted(acc[0])} "
                      f"direct {sorted(acc[1])}")

    def check_ecdsa(self, app: int, step: dict[str, Any], p: dict[str, Any],
                    r: dict[str, Any]) -> None:
        """A signature by the imported EC key verifies with its public key (both sides)."""
        key = step.get("k") or self.sessions[app][step["s"]].ops.get("Sign", "")
        obj = self.objs[app].get(key)
        if obj is None or obj.kind != "ecpriv" or "data" not in step or p.get("rv") != OK:
            return
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, utils
        pub = serialization.load_pem_public_key(self.env.keys["ec_public"].encode())
        data = bytes.fromhex(step["data"])
        for side, reply in (("p11p", p), ("direct", r)):
            sig = bytes.fromhex(reply["out"])
            der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                             int.from_bytes(sig[32:], "big"))
            try:
                pub.verify(der, data, ec.ECDSA(utils.Prehashed(hashes.SHA256())))  # type: ignore[union-attr,call-arg]
            except (InvalidSignature, ValueError):
                self.fail(app, step, p, r, f"the {side} ECDSA signature does not verify")

    def made_by_the_token_only(self, app: int, step: dict[str, Any], r: dict[str, Any]) -> None:
        """A call that makes objects, refused through p11p in a documented way and done
        by the token used directly: what it made is the reference's alone (the model
        does not name it), and a search through p11p does not find it."""
        if r.get("rv") == OK:
            self.lost[app] |= {step[k] for k in ("o", "pub", "priv") if step.get(k)}

    def destroyed_by_the_token_only(self, app: int, step: dict[str, Any], p: dict[str, Any],
                                    r: dict[str, Any]) -> None:
        """A C_DestroyObject refused through p11p in a documented way and done by the
        token used directly: the object lives on through p11p only (a search there may
        find it), and its handle is stale on the reference (the generator names it no
        more; a replay that does is not compared)."""
        if step["op"] != "destroy" or r.get("rv") != OK or p.get("rv") == OK:
            return
        name = step["o"]
        obj = self.objs[app].get(name)
        for other in range(APPS):
            if other == app or (obj is not None and obj.token):
                self.objs[other].pop(name, None)
                self.apart[other].add(name)
                self.extra[other].add(name)

    def diverge(self, app: int, s: str) -> None:
        self.allowed += 1
        sess = self.sessions[app].get(s)
        if sess is not None:
            sess.diverged = True
        for name in [n for n, o in self.objs[app].items() if o.owner in self.tainted[app]]:
            del self.objs[app][name]  # the generator names them no more
            self.lost[app].add(name)  # the reference still has them; a search may not

    # -- the model after a step -------------------------------------------------------------

    def update(self, app: int, step: dict[str, Any], p: dict[str, Any], r: dict[str, Any]) -> None:
        op, ok = step["op"], p.get("rv") == OK and r.get("rv") == OK
        sessions, objs = self.sessions[app], self.objs[app]
        if op == "opinit" and step.get("s") in sessions:
            sessions[step["s"]].last[step["fn"]] = (step.get("k", ""), step["mech"]["m"])
        if "id" in step and "out" in p and "out" in r:
            self.values[step["id"]] = (p["out"], r["out"], dict(step))
        if p.get("rv") == OK and op == "getattr" and MATERIAL & set(step["a"]):
            self.mark_used(app, step["o"])  # its bits shown (p11p: shapes.reveals)
        if p.get("rv") == OK and op in ("opinit", "wrap", "digestkey", "derive", "unwrap"):
            # p11p used the key (its bits may show), even where the token used directly
            # refused the call in a documented way
            for k in ("k", "wk", "base", "uk"):
                self.mark_used(app, step.get(k))
        if p.get("rv") == OK and op == "copy" and self.is_token_write(step):
            # a token copy keeps the bits where no failover remakes them (README, Limits)
            self.mark_used(app, step.get("src"))
        if op == "find":
            for name in set(r.get("found", [])) ^ set(p.get("found", [])):
                if name in self.stale[app]:
                    # a stale handle found again on one side only (a part of a search,
                    # which holds other objects on each side, the order being the
                    # token's; p11p's search ran on a member that does not hold it:
                    # Documented.token_object_on_one_member; or one side's search was
                    # refused in a documented way): its handle is new there and stale on
                    # the other, so no call compares
                    objs.pop(name, None)
                    self.apart[app].add(name)
        if not ok:
            if op in ("update", "final", "oneshot") and step.get("fn") in sessions.get(
                    step.get("s", ""), Session(True)).ops:
                # a failed part ends the operation (PKCS#11), except a too-short buffer
                if p.get("rv") != CKR["CKR_BUFFER_TOO_SMALL"]:
                    sessions[step["s"]].ops.pop(step["fn"], None)
                    sessions[step["s"]].refused_end = True
            return
        s = step.get("s")
        if op == "open":
            sessions[s] = Session(step.get("rw", True))
        elif op == "close":
            if self.armed():
                # an operation of another session whose used key (made at random) goes
                # with this one: a fault armed may still take that session, whose replay
                # then has no key (as in apply_event)
                for name, sess in sessions.items():
                    keys = [objs.get(k) for k in sess.ops.values() if k]
                    if name != s and any(o is not None and o.owner == s and o.random and o.used
                                         for o in keys):
                        self.tainted[app].add(name)
            sessions.pop(s, None)
            self.drop_session_objects(app, {s})
            if not sessions:
                self.logged_out(app, every_handle=True)
        elif op == "closeall":
            self.drop_session_objects(app, set(sessions))
            sessions.clear()
            self.logged_out(app, every_handle=True)
        elif op == "login":
            self.logged_in[app] = True
        elif op == "logout":
            self.logged_out(app)
        elif op == "find_init":
            sessions[s].finding, sessions[s].find_stale = True, False
            self.homed_at_init[(app, s)] = set(self.homes)
        elif op == "find":
            both = set(r.get("found", []))
            # a part of a search may hold other objects on each side (the order is the
            # token's): only what both returned is known to both applications
            for name in [n for n in p.get("found", []) if n in both]:
                if name in self.stale[app] and name in objs:
                    objs[name].found = True  # a new handle, from a search
                self.stale[app].discard(name)
                self.apart[app].discard(name)  # a new handle on both sides
                if name in objs:
                    continue
                if name in IMPORTED:
                    objs[name] = Obj(IMPORTED[name], True, None, app=app,
                                     private=IMPORTED[name] != "find")
                elif name.startswith("m-"):
                    made = self.made.get(name)
                    if made is not None and not made.token:
                        # a session object the model dropped (diverge): found again, it is
                        # still its session's, with the bits it had (used or not)
                        made.found = True
                        objs[name] = made
                    elif made is not None:
                        objs[name] = Obj(made.kind, True, None, made.random, app=made.app,
                                         private=made.private, found=True, copied=made.copied)
        elif op == "find_final":
            sessions[s].finding = sessions[s].find_stale = False
        elif op in ("create", "genkey", "copy", "unwrap", "derive"):
            token = self.is_token_write(step)
            src = [objs.get(step.get(k, "")) for k in ("src", "uk", "base", "k")]
            random = op == "genkey" or any(o is not None and o.random for o in src) or (
                op == "unwrap" and isinstance(step.get("data"), dict))
            kind = step.get("kind", "data")
            if op == "copy" and step["src"] in objs:
                kind = objs[step["src"]].kind
            private = ["CKA_PRIVATE", False] not in (step.get("t") or [])
            if op == "copy" and step["src"] in objs:
                private = objs[step["src"]].private
            roots = frozenset({step["o"]}) if op == "genkey" else frozenset().union(
                *(o.roots for o in src if o is not None))
            obj = Obj(kind, token, None if token else s, random, app=app, private=private,
                      copied=op == "copy", roots=roots,
                      used=any(o is not None and o.used and o.roots for o in src))
            if obj.used and obj.owner is not None and self.armed():
                self.tainted[app].add(obj.owner)  # made of used bits a fault may take
            objs[step["o"]] = obj
            self.made[step["o"]] = obj
            if not token:
                home = next((self.homes.get(n) or self.home_made.get(n) for n in
                             (step.get(k) for k in ("src", "uk", "base", "k")) if n
                             and (n in self.homes or n in self.home_made)), None)
                if home is not None:
                    self.home_made[step["o"]] = home
        elif op == "genpair":
            token = self.is_token_write(step)
            for name, kind in ((step["pub"], "gecpub"), (step["priv"], "gecpriv")):
                private = kind == "gecpriv" and ["CKA_PRIVATE", False] not in step["priv_t"]
                obj = Obj(kind, token, None if token else s, True, app=app,
                          roots=frozenset({step["pub"]}), private=private)
                objs[name] = self.made[name] = obj
        elif op == "destroy":
            objs.pop(step["o"], None)
            if not any(step["o"] in sess.ops.values()
                       for both in self.sessions for sess in both.values()):
                # an operation's key destroyed is kept for it (p11p makes it again for
                # its replay, from its recipe): the member it needs stays its member
                self.homes.pop(step["o"], None)
                self.home_made.pop(step["o"], None)
            for other in self.objs:
                other.pop(step["o"], None)
        elif op == "opinit":
            sessions[s].ops[step["fn"]] = step.get("k", "")
            self.mark_used(app, step.get("k"))
        elif op in ("oneshot", "final"):
            if step.get("q") and "out" not in r and r.get("qlen", 0) > 1 << 20:
                # an absurd length answered the query (SoftHSM2's CK_UNAVAILABLE_INFORMATION
                # for a decryption's final): the worker made no call after it, and the
                # operation goes on on both sides
                return
            key = sessions[s].ops.pop(step["fn"], None)
            self.mark_used(app, key)
        elif op in ("wrap",):
            self.mark_used(app, step.get("wk"))
            self.mark_used(app, step.get("k"))
        elif op == "digestkey":
            self.mark_used(app, step.get("k"))
            key = objs.get(step.get("k", ""))
            if key is not None and key.random and "Digest" in sessions[s].ops:
                sessions[s].ops["Digest"] = step["k"]  # the digest depends on it now

    def logged_out(self, app: int, every_handle: bool = False) -> None:
        """A logout makes the handles of private objects stale on the token; the last
        session's end makes every handle stale (SoftHSM2 forgets the slot's handles)."""
        self.logged_in[app] = False
        # a CKR_USER_NOT_LOGGED_IN rule goes only where every application is logged in
        # (machine.py: then it can only mean a lost session); one not spent goes now, or
        # it would answer this application as the token rightly could
        for m, lines in self.env.rules.items():
            if any("rv=CKR_USER_NOT_LOGGED_IN " in line for line in lines):
                self.env.rules[m] = []
                self.env.write_rules(m)
        self.stale[app] |= {n for n, o in self.objs[app].items() if o.private or every_handle}
        if self.armed():
            for o in self.objs[app].values():  # a fault armed may take them now
                if self.needs_login(app, o) and o.owner is not None:
                    self.tainted[app].add(o.owner)
        for sess in self.sessions[app].values():
            sess.find_stale = sess.finding

    def mark_used(self, app: int, name: str | None) -> None:
        obj = self.objs[app].get(name or "")
        if obj is None or not obj.random or obj.token:
            return
        armed = self.armed()
        for o in self.objs[app].values():  # what shares its bits is used with it
            if o is obj or (o.roots & obj.roots and not o.token):
                o.used = True
                if o.owner is not None and armed:
                    self.tainted[app].add(o.owner)  # a fault armed before its use may hit it

    def drop_session_objects(self, app: int, sessions: set[str]) -> None:
        # an operation of another session whose key a fault may have taken with its
        # (tainted) session keeps that doubt after the session closes
        lost = sessions & self.tainted[app]
        for name, sess in self.sessions[app].items():
            keys = (self.made.get(k) for k in sess.ops.values() if k)
            if name not in sessions and any(o is not None and o.owner in lost for o in keys):
                self.tainted[app].add(name)
        for name in [n for n, o in self.objs[app].items() if o.owner in sessions]:
            if self.objs[app][name].owner in lost:
                # a search begun before the close may still name it on the token's side
                # (its result is taken at the init), while p11p's lost it (failover-97)
                self.lost[app].add(name)
            del self.objs[app][name]
            self.home_made.pop(name, None)
        self.tainted[app] -= sessions
        for s in sessions:
            self.finds.pop((app, s), None)
            self.homed_at_init.pop((app, s), None)

    # -- events ---------------------------------------------------------------------------

    def apply_event(self, ev: dict[str, Any]) -> None:
        kind, m = ev["ev"], ev.get("m")
        if kind == "settle":
            ev = {**ev, "exempt": sorted(self.down | self.drained)}
        if kind == "restart" and ev.get("how") == "kill":
            # README, "What still needs care after a restart": an operation's update or
            # end is written to the state file within LAZY_MAX after its reply, "and a kill
            # in that window loses them as a failover would"
            now = time.monotonic()
            for app in range(APPS):
                behind = {name for name, at in self.moved_at[app].items()
                          if now - at < KILL_WINDOW and name in self.sessions[app]}
                self.tainted[app] |= behind
                self.unsure[app] |= behind
                # and the daemon that takes over replays none of the operations it finds
                # (daemon/takeback.py): lost if their member fails
                self.tainted[app] |= {name for name, sess in self.sessions[app].items()
                                      if sess.ops}
        self.env.event(ev)
        if kind == "down":
            self.down.add(m)  # type: ignore[arg-type]
        elif kind == "hang":
            self.hung.add(m)  # type: ignore[arg-type]
        elif kind == "up":
            self.down.discard(m)  # type: ignore[arg-type]
        elif kind == "drain":
            self.drained.add(m)  # type: ignore[arg-type]
        elif kind == "enable":
            self.drained.discard(m)  # type: ignore[arg-type]
        elif kind == "kill":
            self.killed.add(m)  # type: ignore[arg-type]
        elif kind == "settle":
            self.hung.clear()
            self.killed.clear()
            # a rule whose count is not spent yet stays armed past a settle
            rules = [line for lines in self.env.rules.values() for line in lines]
            self.general_errors = any("rv=CKR_GENERAL_ERROR" in line for line in rules)
            self.failing_errors = False
        elif kind == "error" and ev.get("rv") == "CKR_GENERAL_ERROR":
            self.general_errors = True
        elif kind == "error" and ev.get("rv") == "CKR_OBJECT_HANDLE_INVALID" \
                and ev.get("fn") == "C_GetAttributeValue" and ev.get("count", 1) >= 2:
            self.handle_lies = True
        elif kind == "error" and ev.get("rv") in MEMBER_FAILED_RVS or kind in ("kill", "down"):
            self.failing_errors = True  # a helper that dies fails its member too
        if kind not in ("settle", "enable", "up", "restart"):
            self.events += 1
            # sessions holding used objects of random material may lose them (Documented)
            for app in range(APPS):
                for o in self.objs[app].values():
                    if (o.used or self.needs_login(app, o)) and o.owner is not None:
                        self.tainted[app].add(o.owner)
                for name, sess in self.sessions[app].items():
                    # an operation whose used key went with its session (closed): its
                    # replay has no key; nor has one whose token key was destroyed
                    # (README, Limits: it stays on its member, lost if that one fails)
                    gone = [self.made.get(k) for k in sess.ops.values()
                            if k and k not in self.objs[app]]
                    if any(o is not None and (o.token or (o.random and o.used)) for o in gone):
                        self.tainted[app].add(name)

    def needs_login(self, app: int, obj: Obj) -> bool:
        """Documented (README, Limits): a private session object, and a session key
        pair whose private half is private, can be made again on another member only
        while the application is logged in."""
        if self.logged_in[app] or obj.token:
            return False
        # the private half counts also when the application destroyed it: the pair is
        # made again whole (the half destroyed goes again at once)
        return obj.private or (obj.kind in ("gecpub", "gecpriv") and any(
            q.kind == "gecpriv" and q.private and q.roots == obj.roots
            for q in [*self.objs[app].values(), *self.made.values()]))

    def used_random_objects(self) -> bool:
        return any(o.used and o.owner is not None for objs in self.objs for o in objs.values())

    def armed(self) -> bool:
        """A fault may still hit: a rule waits on a member, one is out of service, or a
        helper was killed (p11p fails its member when it learns of it)."""
        return any(self.env.rules.values()) or bool(self.out_of_service() or self.killed)

    def out_of_service(self) -> set[str]:
        return self.down | self.hung | self.drained

    def may_hit(self, m: str) -> bool:
        """A transient fault: never on a member holding a token object written through
        p11p (write_policy "primary" writes to one member: README, Limits), nor on the
        one a session object made from such an object needs."""
        homes = set(self.homes.values()) | set(self.home_made.values())
        return m not in homes and "?" not in homes

    def may_take_down(self, m: str) -> bool:
        """At least one member stays in service, and no member holding a token object
        written through p11p (write_policy "primary": README, Limits) is touched."""
        if not self.may_hit(m):
            return False
        return len(self.out_of_service() | {m}) < len(self.env.members)


def replay(env: Env, steps: list[dict[str, Any]], verbose: bool = True) -> Runner:
    """Runs a kept sequence from a fresh start (the regression tests)."""
    runner = Runner(env, verbose=verbose)
    for step in steps:
        runner.run(step)
    return runner


def failure_of(env: Env, steps: list[dict[str, Any]]) -> str | None:
    """The first line of the discrepancy a sequence meets from a fresh start, or None."""
    try:
        replay(env, steps, verbose=False)
    except Discrepancy as exc:
        return exc.signature or str(exc).splitlines()[0]
    except (HarnessError, KeyError):  # a step needs what a removed step made
        return None
    return None


def shrink(env: Env, steps: list[dict[str, Any]], why: str, budget: float) -> list[dict[str, Any]]:
    """Delta debugging over the steps: the shortest sequence found within `budget`
    seconds that still meets the same discrepancy (same first line)."""
    deadline = time.monotonic() + budget
    steps = list(steps)
    # the failing step is the last one that ran; what follows it never ran
    n = 2
    while len(steps) >= 2 and time.monotonic() < deadline:
        chunk = max(len(steps) // n, 1)
        removed = False
        for start in range(len(steps) - 1 - chunk, -1, -chunk) if chunk < len(steps) else []:
            if time.monotonic() >= deadline:
                break
            candidate = steps[:start] + steps[start + chunk:]
            if failure_of(env, candidate) == why:
                steps, removed = candidate, True
                break
        if removed:
            n = max(n - 1, 2)
        elif chunk == 1:
            break
        else:
            n = min(n * 2, len(steps))
    return steps
