"""A long flapping run (issue 12): helper count and RSS stay flat while the members of a
two-member group fail and come back, one at a time, for minutes under a real load.

Not a pytest test (no test_ prefix); run it by hand:

    python3 tests/ha/flap_run.py --minutes 10 [--policy failover|balance]

What it does, all in a temporary directory it keeps (its path is printed):

- two SoftHSM2 tokens holding the same imported keys (tests/ha/import_keys.py), a daemon
  with one group of both behind p11p-faultsim.so (tests/ha/hakit.py HAGroup:
  call_timeout 1.5, hold_timeout 2, recovery interval 0.2);
- the load, for the whole run: APPS signer processes (each its own application context)
  with THREADS threads each signing with the imported ECDSA key (C_SignInit + C_Sign,
  every signature verified) and one session-churn thread each (C_OpenSession, C_Login,
  C_GenerateRandom, sign + verify, C_CloseSession), plus one context-churn process that
  cycles C_Initialize, open, C_Login, sign + verify, C_Logout, close, C_Finalize (a new
  application context, and new helpers, every cycle);
- the faults, for the whole run: alternately on hsmA and hsmB, never both at once (a
  member is faulted only once the other one is OK again), one of `* error
  rv=CKR_DEVICE_ERROR`, `C_Sign crash`, `* crash`, `* hang` (held past call_timeout),
  `* close-sessions`, or a clean period (--faults picks a subset), each held 1-2 s; a
  token file that a crash left empty is put back afterwards (SoftHSM2's file store
  loses it, an HSM would not);
- every SAMPLE seconds: the daemon's helper processes (count, summed RSS and PSS from
  /proc/PID/smaps_rollup), the daemon's RSS, the member states, calls and errors so far.

At the end: first vs last minute averages and a verdict. An error is any call that did
not return what it should (CKR_OK; for C_Login of an already logged-in application also
CKR_USER_ALREADY_LOGGED_IN) or a signature that does not verify; each is printed with
its code and time, and the daemon's log lines around the first ones.

Exit code: 0 when all of these hold, otherwise the first that does not:
  1  resources: after the applications end the daemon is back to its warm pool (the
     helper count before the load) within 30 s with no unreaped helper; the last
     minute's mean helper count is at most the reference minute's + 1; the last
     minute's mean RSS per helper is at most the reference minute's + 10 %. The
     reference minute is the second (the first is warm-up: its helpers are new and
     have not yet grown their module's working set); in a run under 3 min, the first;
  2  errors: the applications saw at least one error (p11p promises none while one
     member is in service);
  3  the run itself failed (set-up, an application that died).
"""

from __future__ import annotations

import argparse
import ctypes as C
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ckraw import CK_ULONG, CKA, CKM, Module, mechanism, template  # noqa: E402
from hakit import make_keys  # noqa: E402
from kit import CLIENT_SO, SOFTHSM_SO, USER_PIN, SoftHSM, helper_pids, zombies  # noqa: E402

CKR_USER_ALREADY_LOGGED_IN = 0x100
MEMBERS = ["hsmA", "hsmB"]
CALL_TIMEOUT = 1.5  # hakit.HAGroup's
FAULTS = [
    ("error", "* error rv=CKR_DEVICE_ERROR\n"),
    ("sign-crash", "C_Sign crash\n"),
    ("crash", "* crash\n"),
    ("hang", "* hang\n"),
    ("close-sessions", "* close-sessions\n"),
    ("clean", ""),
]
RSS_MARGIN = 0.10  # last minute's RSS per helper at most +10 % of the reference minute's
COUNT_MARGIN = 1.0  # last minute's mean helper count at most the reference minute's + 1
BACK_TO_POOL = 30.0  # seconds for the daemon to return to its warm pool after the load
ERROR_BACKOFF = 0.05  # an application thread waits this long after a failed round
EPISODE_GAP = 2.0  # errors less than this apart are one episode


# -- the application processes (this file run with --app) --------------------------------


class Load:
    """Counts and errors of one application process, reported as JSON lines on stdout."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.calls = 0
        self.ops = 0
        self.errors = 0
        self.max_lat = 0.0
        self.max_what = ""
        self.max_at = 0.0
        self.slow = 0  # calls over call_timeout

    def emit(self, obj: dict[str, Any]) -> None:
        with self.lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def call(self, what: str, fn: Any, *args: Any, ok: tuple[int, ...] = (0,)) -> bool:
        start = time.monotonic()
        rv = int(fn(*args))
        lat = time.monotonic() - start
        with self.lock:
            self.calls += 1
            if lat > self.max_lat:
                self.max_lat, self.max_what, self.max_at = lat, what, time.time()
            if lat > CALL_TIMEOUT:
                self.slow += 1
        if rv in ok:
            return True
        self.error(what, f"{rv:#x}", lat)
        return False

    def error(self, what: str, code: str, lat: float = 0.0) -> None:
        with self.lock:
            self.errors += 1
        self.emit({"ev": "err", "app": self.name, "t": time.time(), "what": what, "rv": code,
                   "lat": round(lat, 3)})

    def stat(self) -> None:
        with self.lock:
            s = {"ev": "stat", "app": self.name, "calls": self.calls, "ops": self.ops,
                 "errors": self.errors, "max_lat": self.max_lat, "max_what": self.max_what,
                 "max_at": self.max_at, "slow": self.slow}
        self.emit(s)


def _verifier(keys: dict[str, Any]) -> Any:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
    public = serialization.load_pem_public_key(keys["ec_public"].encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)

    def verify(digest: bytes, sig: bytes) -> bool:
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
        try:
            public.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except Exception:
            return False
        return True

    return verify


class Client:
    """One initialised p11p-client.so (one application context) and the calls the load
    makes on it, each counted by `load`."""

    def __init__(self, m: Module, load: Load, verify: Any) -> None:
        self.m, self.load, self.verify = m, load, verify
        self.slot = -1
        self.key = 0

    def setup(self) -> bool:
        """C_Initialize, find the slot labelled "ha"."""
        if not self.load.call("C_Initialize", lambda: self.m.initialize()):
            return False
        n = CK_ULONG()
        if not self.load.call("C_GetSlotList", self.m.C_GetSlotList, 1, None, C.byref(n)):
            return False
        arr = (CK_ULONG * max(n.value, 1))()
        if not self.load.call("C_GetSlotList", self.m.C_GetSlotList, 1, arr, C.byref(n)):
            return False
        for s in arr[: n.value]:
            info = (C.c_ubyte * 512)()
            if not self.load.call("C_GetTokenInfo", self.m.C_GetTokenInfo, s, info):
                return False
            if bytes(info[:32]).rstrip() == b"ha":
                self.slot = int(s)
                return True
        self.load.error("find slot", "no slot labelled ha")
        return False

    def open(self) -> int | None:
        h = CK_ULONG()
        flags = 0x4 | 0x2  # CKF_SERIAL_SESSION | CKF_RW_SESSION
        if self.load.call("C_OpenSession", self.m.C_OpenSession, self.slot, flags, None, None,
                          C.byref(h)):
            return int(h.value)
        return None

    def login(self, h: int, already_ok: bool) -> bool:
        pin = USER_PIN.encode()
        ok = (0, CKR_USER_ALREADY_LOGGED_IN) if already_ok else (0,)
        return self.load.call("C_Login", self.m.C_Login, h, 1, pin, len(pin), ok=ok)

    def find_key(self, h: int) -> bool:
        t, n, keep = template((CKA["CKA_LABEL"], b"ha-ec"), (CKA["CKA_CLASS"], 3))
        if not self.load.call("C_FindObjectsInit", self.m.C_FindObjectsInit, h, t, n):
            return False
        out, count = (CK_ULONG * 2)(), CK_ULONG()
        found = self.load.call("C_FindObjects", self.m.C_FindObjects, h, out, 2, C.byref(count))
        final = self.load.call("C_FindObjectsFinal", self.m.C_FindObjectsFinal, h)
        if found and count.value != 1:
            self.load.error("C_FindObjects", f"{count.value} keys labelled ha-ec")
            return False
        if found and final:
            self.key = int(out[0])
        return found and final

    def sign(self, h: int) -> bool:
        """C_SignInit + C_Sign with ECDSA, the signature verified."""
        mech, _ = mechanism(CKM["CKM_ECDSA"])
        if not self.load.call("C_SignInit", self.m.C_SignInit, h, C.byref(mech), self.key):
            return False
        digest = os.urandom(32)
        sig, ln = (C.c_ubyte * 64)(), CK_ULONG(64)
        if not self.load.call("C_Sign", self.m.C_Sign, h, digest, 32, sig, C.byref(ln)):
            return False
        if ln.value != 64 or not self.verify(digest, bytes(sig[: ln.value])):
            self.load.error("C_Sign", "signature does not verify")
            return False
        with self.load.lock:
            self.load.ops += 1
        return True

    def random(self, h: int) -> bool:
        buf = (C.c_ubyte * 32)()
        return self.load.call("C_GenerateRandom", self.m.C_GenerateRandom, h, buf, 32)

    def close(self, h: int) -> bool:
        return self.load.call("C_CloseSession", self.m.C_CloseSession, h)


def run_signer(name: str, keys: dict[str, Any], threads: int, seconds: float) -> None:
    """THREADS signing threads on sessions of their own, one session-churn thread."""
    load = Load(name)
    cl = Client(Module(str(CLIENT_SO)), load, _verifier(keys))
    if not cl.setup():
        raise SystemExit("set-up failed")
    base = cl.open()
    if base is None or not cl.login(base, False) or not cl.find_key(base):
        raise SystemExit("set-up failed")
    stop = time.monotonic() + seconds

    def signer() -> None:
        h = None
        while time.monotonic() < stop:
            if h is None:
                h = cl.open()
                if h is None:
                    time.sleep(0.1)
                    continue
            if not cl.sign(h):
                time.sleep(ERROR_BACKOFF)
        if h is not None:
            cl.close(h)

    def churn() -> None:
        while time.monotonic() < stop:
            h = cl.open()
            if h is None:
                time.sleep(0.1)
                continue
            ok = cl.login(h, True) and cl.random(h) and cl.sign(h)
            ok = cl.close(h) and ok
            time.sleep(0.05 if ok else ERROR_BACKOFF)

    ts = [threading.Thread(target=signer) for _ in range(threads)]
    ts.append(threading.Thread(target=churn))
    for t in ts:
        t.start()
    while any(t.is_alive() for t in ts):
        load.stat()
        time.sleep(1.0)
    cl.close(base)
    load.call("C_Finalize", cl.m.C_Finalize, None)
    load.stat()


def run_cycler(name: str, keys: dict[str, Any], seconds: float) -> None:
    """One application context after another: initialise, log in, sign, log out,
    finalise."""
    load = Load(name)
    verify = _verifier(keys)
    m = Module(str(CLIENT_SO))
    stop = time.monotonic() + seconds
    last = 0.0
    while time.monotonic() < stop:
        cl = Client(m, load, verify)
        if cl.setup():
            h = cl.open()
            if h is not None:
                if cl.login(h, False) and cl.find_key(h):
                    cl.sign(h)
                    load.call("C_Logout", m.C_Logout, h)
                cl.close(h)
        load.call("C_Finalize", m.C_Finalize, None)
        if time.monotonic() - last > 1.0:
            load.stat()
            last = time.monotonic()
        time.sleep(0.3)
    load.stat()


# -- the run (this file run without --app) -----------------------------------------------


def mem_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in kB from /proc/PID/smaps_rollup; (0, 0) if the process is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        return 0, 0
    return rss, pss


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.workdir) if args.workdir else Path(
            __import__("tempfile").mkdtemp(prefix="flap_run."))
        self.group: Any = None
        self.apps: list[subprocess.Popen[str]] = []
        self.readers: list[threading.Thread] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.stats: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.printed: dict[tuple[str, str, str], float] = {}
        self.faults = 0
        self.fault_log: list[tuple[float, str, str]] = []
        self.repairs = 0
        self.waits: list[float] = []  # how long a member took to be OK before the other's fault
        self.samples: list[dict[str, Any]] = []
        self.load_start = 0.0
        self.saved: dict[Path, bytes] = {}
        self.rng = random.Random(args.seed)
        self.code = "?"
        wanted = args.faults.split(",") if args.faults else [n for n, _ in FAULTS]
        unknown = set(wanted) - {n for n, _ in FAULTS}
        if unknown:
            raise SystemExit(f"unknown fault: {', '.join(sorted(unknown))}")
        self.faults_used = [(n, r) for n, r in FAULTS if n in wanted]

    def log(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    # -- set-up ------------------------------------------------------------------------

    def setup(self) -> None:
        from hakit import HAGroup
        self.log(f"work directory {self.root}")
        self.code = code_version()
        self.log(f"daemon code: {self.code}")
        self.keys = self.root / "keys.json"
        make_keys(self.keys)
        hsm = SoftHSM(self.root / "softhsm")
        for label in MEMBERS:
            hsm.init_token(label)
            subprocess.run([sys.executable, str(HERE / "import_keys.py"), str(SOFTHSM_SO), label,
                            USER_PIN, str(self.keys)], env={**os.environ, **hsm.env}, check=True)
        self.saved = {f: f.read_bytes() for f in hsm.tokens.glob("*/*.object")}
        self.group = HAGroup(self.root / "g", hsm, self.args.policy, MEMBERS)
        self.group.daemon.start()
        self.log(f"daemon pid {self.group.daemon.pid}, log {self.group.daemon.log}")

    def repair(self) -> None:
        for path, data in self.saved.items():
            try:
                if path.stat().st_size == 0:
                    path.write_bytes(data)
                    self.repairs += 1
                    self.event("-", f"repaired {path.parent.name}/{path.name}")
            except OSError:
                pass

    # -- the load ----------------------------------------------------------------------

    def start_apps(self, seconds: float) -> None:
        env = {**os.environ, **self.group.daemon.env}
        cmds = [[sys.executable, __file__, "--app", "signer", "--name", f"signer{i}",
                 "--keys", str(self.keys), "--threads", str(self.args.threads),
                 "--seconds", str(seconds)] for i in range(self.args.apps)]
        if not self.args.no_cycler:
            cmds.append([sys.executable, __file__, "--app", "cycler", "--name", "cycler",
                         "--keys", str(self.keys), "--seconds", str(seconds)])
        for cmd in cmds:
            err = open(self.root / f"{cmd[cmd.index('--name') + 1]}.stderr", "w")
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            self.apps.append(p)
            t = threading.Thread(target=self.read_app, args=(p,), daemon=True)
            t.start()
            self.readers.append(t)
        self.log("applications: " + ", ".join(
            f"{c[c.index('--name') + 1]} pid {p.pid}" for c, p in zip(cmds, self.apps, strict=True)))

    def read_app(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                if ev["ev"] == "stat":
                    self.stats[ev["app"]] = ev
                elif ev["ev"] == "err":
                    self.errors.append(ev)
            if ev["ev"] == "err":
                key = (ev["app"], ev["what"], ev["rv"])
                with self.lock:
                    quiet = ev["t"] - self.printed.get(key, 0.0) < 5.0
                    if not quiet:
                        self.printed[key] = ev["t"]
                if not quiet:  # one line per application, call and code every 5 s
                    self.log(f"ERROR {ev['app']} {ev['what']} {ev['rv']} after {ev['lat']:.3f} s "
                             f"(at {fmt_t(ev['t'])}; last fault {self.last_fault(ev['t'])})")

    def totals(self) -> dict[str, Any]:
        with self.lock:
            st = list(self.stats.values())
        if not st:
            return {"calls": 0, "ops": 0, "errors": 0, "max_lat": 0.0, "max_what": "",
                    "max_at": 0.0, "max_app": "", "slow": 0}
        top = max(st, key=lambda s: s["max_lat"])
        return {"calls": sum(s["calls"] for s in st), "ops": sum(s["ops"] for s in st),
                "errors": sum(s["errors"] for s in st), "max_lat": top["max_lat"],
                "max_what": top["max_what"], "max_at": top["max_at"], "max_app": top["app"],
                "slow": sum(s["slow"] for s in st)}

    # -- the faults --------------------------------------------------------------------

    def event(self, member: str, what: str) -> None:
        with self.lock:
            self.fault_log.append((time.time(), member, what))
        with open(self.root / "faults.events", "a") as f:
            f.write(f"{fmt_t(time.time())} {member} {what}\n")

    def last_fault(self, t: float) -> str:
        with self.lock:
            before = [f for f in self.fault_log if f[0] <= t]
        if not before:
            return "-"
        ft, member, what = before[-1]
        return f"{member} {what} {t - ft:.2f} s before"

    def state(self, member: str) -> str:
        try:
            return str(self.group.member(member)["state"])
        except Exception as exc:  # the admin socket busy or gone: say so, go on
            return f"? ({exc})"

    def flapper(self) -> None:
        i = 0
        while not self.stop.is_set():
            member, other = MEMBERS[i % 2], MEMBERS[(i + 1) % 2]
            # never both at once: the other member is in service before this one fails
            start = time.monotonic()
            while not self.stop.is_set() and self.state(other) != "OK":
                self.repair()  # a crash may empty a token file a little after its fault
                time.sleep(0.05)
            waited = time.monotonic() - start
            self.waits.append(waited)
            if waited > 10:
                self.log(f"note: {other} took {waited:.1f} s to be OK again")
            if self.stop.is_set():
                break
            name, rule = self.faults_used[self.rng.randrange(len(self.faults_used))]
            hold = self.rng.uniform(1.0, 2.0)
            if name == "hang":
                hold = max(hold, CALL_TIMEOUT + 0.5)
            self.group.set_rules(member, rule)
            self.faults += 1
            self.event(member, f"{name} for {hold:.2f} s")
            self.stop.wait(hold)
            self.group.set_rules(member, "")
            self.event(member, "clean")
            self.repair()
            self.stop.wait(self.rng.uniform(0.2, 0.6))
            i += 1
        for m in MEMBERS:
            self.group.set_rules(m, "")
        self.repair()

    # -- samples -----------------------------------------------------------------------

    def sample(self, label: str) -> dict[str, Any]:
        dpid = self.group.daemon.pid
        pids = helper_pids(dpid)
        mems = [mem_kb(p) for p in pids]
        tot = self.totals()
        s = {"t": time.monotonic() - self.load_start if self.load_start else 0.0,
             "label": label, "helpers": len(pids), "rss": sum(r for r, _ in mems),
             "pss": sum(p for _, p in mems), "daemon_rss": mem_kb(dpid)[0],
             "zombies": len(zombies(dpid)), "states": {m: self.state(m) for m in MEMBERS},
             "calls": tot["calls"], "ops": tot["ops"], "errors": tot["errors"],
             "faults": self.faults}
        s["rss_per"] = s["rss"] / s["helpers"] if s["helpers"] else 0.0
        self.samples.append(s)
        self.log(f"{label:>6} t={s['t']:6.0f}s helpers={s['helpers']:3d} "
                 f"rss={s['rss'] / 1024:7.1f}M ({s['rss_per'] / 1024:5.1f}M/helper) "
                 f"pss={s['pss'] / 1024:7.1f}M daemon_rss={s['daemon_rss'] / 1024:6.1f}M "
                 f"zombies={s['zombies']} "
                 + " ".join(f"{m}={st}" for m, st in s["states"].items())
                 + f" calls={s['calls']} signatures={s['ops']} errors={s['errors']} "
                 f"faults={s['faults']}")
        return s

    # -- the whole run -----------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        dpid = self.group.daemon.pid
        if not wait(lambda: len(helper_pids(dpid)) == 2, 15):
            self.log(f"note: warm pool not 2 helpers: {len(helper_pids(dpid))}")
        time.sleep(1.0)
        base = self.sample("idle")
        seconds = self.args.minutes * 60
        self.load_start = time.monotonic()
        self.start_apps(seconds)
        flapper = threading.Thread(target=self.flapper, daemon=True)
        time.sleep(2.0)  # the applications are up before the first fault
        flapper.start()
        next_at = self.load_start + self.args.sample
        while time.monotonic() < self.load_start + seconds:
            time.sleep(max(0.0, min(next_at, self.load_start + seconds) - time.monotonic()))
            if time.monotonic() >= next_at:
                self.sample("load")
                next_at += self.args.sample
            dead = [p for p in self.apps if p.poll() not in (None, 0)]
            if dead:
                self.log(f"application pid {dead[0].pid} exited with {dead[0].returncode}")
                return self.finish(base, failed=True)
        self.stop.set()
        flapper.join(10)
        return self.finish(base, failed=False)

    def finish(self, base: dict[str, Any], failed: bool) -> int:
        self.stop.set()
        for p in self.apps:
            try:
                p.wait(timeout=CALL_TIMEOUT * 4 + 10)
            except subprocess.TimeoutExpired:
                self.log(f"application pid {p.pid} did not end: killed")
                p.kill()
                p.wait()
                failed = True
            if p.returncode != 0:
                self.log(f"application pid {p.pid} exited with {p.returncode}")
                failed = True
        for t in self.readers:
            t.join(5)
        end = time.monotonic()
        self.sample("ended")
        dpid = self.group.daemon.pid
        states_ok = wait(lambda: all(self.state(m) == "OK" for m in MEMBERS), 20)
        back = wait(lambda: len(helper_pids(dpid)) == base["helpers"]
                    and not zombies(dpid), BACK_TO_POOL)
        took = time.monotonic() - end
        final = self.sample("after")
        return self.summary(base, final, back, took, states_ok, failed)

    def summary(self, base: dict[str, Any], final: dict[str, Any], back: bool, took: float,
                states_ok: bool, failed: bool) -> int:
        load = [s for s in self.samples if s["label"] == "load"]
        span = self.args.minutes * 60
        ref = 60.0 if span >= 180.0 else 0.0  # the second minute: the first is warm-up
        first = [s for s in load if ref < s["t"] <= ref + 60.0] or load[:1]
        last = [s for s in load if s["t"] > span - 60.0 - 0.5] or load[-1:]
        tot = self.totals()

        def avg(rows: list[dict[str, Any]], key: str) -> float:
            return sum(r[key] for r in rows) / len(rows) if rows else 0.0

        print()
        print(f"=== flap run: policy {self.args.policy}, {self.args.minutes:g} min, "
              f"faults {','.join(n for n, _ in self.faults_used)}, "
              f"{self.args.apps} signer apps x {self.args.threads} threads + session churn"
              f"{'' if self.args.no_cycler else ' + context-churn app'} ===")
        print(f"work directory: {self.root}")
        print(f"daemon code: {self.code}")
        print(f"{'':28}{'idle':>10}{'ref min':>12}{'last min':>12}{'after':>10}")
        rows = [("helpers (count)", "helpers", 1, "{:.1f}"), ("helper RSS total (MiB)", "rss", 1024, "{:.1f}"),
                ("helper RSS per helper (MiB)", "rss_per", 1024, "{:.2f}"),
                ("helper PSS total (MiB)", "pss", 1024, "{:.1f}"),
                ("daemon RSS (MiB)", "daemon_rss", 1024, "{:.1f}")]
        for title, key, div, f in rows:
            cells = [f.format(base[key] / div), f.format(avg(first, key) / div),
                     f.format(avg(last, key) / div), f.format(final[key] / div)]
            print(f"{title:28}{cells[0]:>10}{cells[1]:>12}{cells[2]:>12}{cells[3]:>10}")
        print(f"samples: {len(first)} in the reference minute (from {ref:g} s), {len(last)} "
              f"in the last; "
              f"helpers max {max((s['helpers'] for s in load), default=0)}, "
              f"zombies seen in {sum(1 for s in load if s['zombies'])} samples")
        print(f"faults applied: {self.faults}; token files put back after a crash: {self.repairs}; "
              f"wait for the other member to be OK before a fault: max "
              f"{max(self.waits, default=0):.2f} s, mean "
              f"{sum(self.waits) / len(self.waits) if self.waits else 0:.2f} s")
        print(f"calls: {tot['calls']}, verified signatures: {tot['ops']}, errors: {tot['errors']}, "
              f"calls over call_timeout ({CALL_TIMEOUT} s): {tot['slow']}")
        print(f"max call latency: {tot['max_lat']:.3f} s ({tot['max_what']} in {tot['max_app']} "
              f"at {fmt_t(tot['max_at'])}; last fault then: {self.last_fault(tot['max_at'])})")
        by_code: dict[str, int] = {}
        for e in self.errors:
            k = f"{e['what']} {e['rv']}"
            by_code[k] = by_code.get(k, 0) + 1
        if by_code:
            print("errors by call and code: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_code.items())))
            eps = episodes(self.errors)
            print(f"error episodes (errors less than {EPISODE_GAP:g} s apart): {len(eps)}")
            for ep in eps:
                codes = ", ".join(f"{k}: {v}" for k, v in sorted(ep["codes"].items()))
                print(f"  {fmt_t(ep['start'])} - {fmt_t(ep['end'])} ({ep['end'] - ep['start']:.1f} s) "
                      f"{ep['count']} errors in {'+'.join(sorted(ep['apps']))}: {codes}; "
                      f"last fault at its start: {self.last_fault(ep['start'])}")
            self.log_excerpts([ep["start"] for ep in eps[:3]])

        checks = []
        checks.append(("back to the warm pool after the load", back,
                       f"{final['helpers']} helpers (idle {base['helpers']}), {final['zombies']} zombies, "
                       f"{took:.1f} s after the applications ended"))
        checks.append(("members OK after the load", states_ok, str(final["states"])))
        c0, c1 = avg(first, "helpers"), avg(last, "helpers")
        checks.append((f"helper count flat (last <= first + {COUNT_MARGIN:g})", c1 <= c0 + COUNT_MARGIN,
                       f"{c0:.1f} -> {c1:.1f}"))
        r0, r1 = avg(first, "rss_per"), avg(last, "rss_per")
        checks.append((f"RSS per helper flat (last <= first + {RSS_MARGIN:.0%})",
                       r1 <= r0 * (1 + RSS_MARGIN),
                       f"{r0 / 1024:.2f} -> {r1 / 1024:.2f} MiB ({(r1 / r0 - 1) if r0 else 0:+.1%})"))
        d0, d1 = avg(first, "daemon_rss"), avg(last, "daemon_rss")
        print(f"daemon RSS: {d0 / 1024:.1f} -> {d1 / 1024:.1f} MiB "
              f"({(d1 / d0 - 1) if d0 else 0:+.1%}; reported, not judged)")
        for name, ok, detail in checks:
            print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")
        print(f"[{'PASS' if not tot['errors'] else 'FAIL'}] no application errors: {tot['errors']}")
        if failed:
            print("[FAIL] the run itself: an application died or did not end")
            code = 3
        elif not all(ok for _, ok, _ in checks):
            code = 1
        elif tot["errors"]:
            code = 2
        else:
            code = 0
        print(f"verdict: {['PASS', 'FAIL (resources)', 'FAIL (errors)', 'FAIL (run)'][code]}, "
              f"exit code {code}")
        return code

    def log_excerpts(self, times: list[float]) -> None:
        """The daemon's log lines from 1.5 s before to 0.5 s after each time (a debug
        line repeated with another time only once)."""
        lines = self.group.daemon.log_text().splitlines()
        for t in times:
            lo, hi = fmt_dt(t - 1.5), fmt_dt(t + 0.5)  # as the daemon logs: date, time
            near = [ln for ln in lines if lo <= ln[:23].replace(",", ".") <= hi]
            seen: set[str] = set()
            shown = []
            for ln in near:
                body = ln[24:]
                if " DEBUG " in ln and body in seen:
                    continue
                seen.add(body)
                shown.append(ln)
            print(f"--- daemon log {lo} - {hi}: {len(near)} lines, {len(shown)} shown ---")
            for ln in shown[-50:]:
                print("  " + ln)

    def cleanup(self) -> None:
        self.stop.set()
        for p in self.apps:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.group is not None:
            for m in MEMBERS:
                try:
                    self.group.set_rules(m, "")
                except OSError:
                    pass
            self.group.daemon.stop()


def episodes(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Errors grouped into episodes: runs of errors less than EPISODE_GAP apart."""
    out: list[dict[str, Any]] = []
    for e in sorted(errors, key=lambda e: e["t"]):
        if not out or e["t"] - out[-1]["end"] >= EPISODE_GAP:
            out.append({"start": e["t"], "end": e["t"], "count": 0, "codes": {}, "apps": set()})
        ep = out[-1]
        ep["end"] = e["t"]
        ep["count"] += 1
        ep["apps"].add(e["app"])
        k = f"{e['what']} {e['rv']}"
        ep["codes"][k] = ep["codes"].get(k, 0) + 1
    return out


def code_version() -> str:
    """The commit the daemon runs, and which of its files differ from it (the daemon
    runs the work tree: a long run is only as good as what it ran)."""
    root = HERE.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "daemon", "helper",
                                "client", "protocol", "faultsim"], cwd=root, text=True,
                               capture_output=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = [ln[3:] for ln in dirty if ln.strip()]
    return f"{head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else " (clean)")


def fmt_dt(t: float) -> str:
    """YYYY-MM-DD HH:MM:SS.mmm, local time."""
    return time.strftime("%Y-%m-%d ", time.localtime(t)) + fmt_t(t)


def fmt_t(t: float) -> str:
    """HH:MM:SS.mmm, local time (as the daemon logs)."""
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def wait(pred: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return bool(pred())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--policy", choices=["failover", "balance"], default="failover")
    ap.add_argument("--apps", type=int, default=2, help="signer processes (contexts)")
    ap.add_argument("--threads", type=int, default=3, help="signing threads per signer")
    ap.add_argument("--no-cycler", action="store_true", help="no context-churn process")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--seed", type=int, default=None, help="for the choice of faults")
    ap.add_argument("--faults", help="comma-separated subset of: "
                    + ",".join(n for n, _ in FAULTS) + " (default: all)")
    ap.add_argument("--workdir", help="instead of a new temporary directory")
    ap.add_argument("--app", choices=["signer", "cycler"], help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--keys", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.app:
        keys = json.load(open(args.keys))
        if args.app == "signer":
            run_signer(args.name, keys, args.threads, args.seconds)
        else:
            run_cycler(args.name, keys, args.seconds)
        return 0

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    run = Run(args)
    try:
        return run.run()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 3
    except Exception:
        traceback.print_exc()
        return 3
    finally:
        run.cleanup()


if __name__ == "__main__":
    sys.exit(main())
