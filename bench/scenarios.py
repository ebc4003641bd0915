"""The benchmark's scenarios beyond the operation matrix: modeled HSMs (members behind
p11p-faultsim.so that add 2 ms per call and serve 2 calls at once), the cost of a member
failing under load, what short-lived applications cost at start-up, and the memory
footprint of the daemon and its helpers. The start-up figures and the helpers' PSS are
measured by bench/helper_costs.py's functions."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs import SOFTHSM_SO, Tokens, kit, p11kit, p11p
from runner import Holder, Target, measure, parse

MODELED_RULES = "* delay ms=2\nconcurrency 2\n"
FAILOVER_SETTINGS = """call_timeout = 5
hold_timeout = 5
[recovery]
interval = 0.5
attempts = 0
"""


def modeled(tokens: Tokens, root: Path, members: list[int], threads: int, seconds: float,
            warmup: float, log=print) -> dict:
    """ECDSA under `threads` threads through p11p with 1, 2, 3 modeled HSMs, and one
    modeled HSM loaded straight into the application for reference."""
    rules = root / "direct.rules"
    root.mkdir(parents=True, exist_ok=True)
    rules.write_text(MODELED_RULES)
    direct = Target("modeled-direct", kit.FAULTSIM_SO, tokens.labels[0],
                    {**tokens.hsm.env, "P11P_FAULTSIM_MODULE": str(SOFTHSM_SO),
                     "P11P_FAULTSIM_RULES": str(rules)})
    out: dict = {"rules": MODELED_RULES, "threads": threads, "op": "ecdsa-p256-sign",
                 "direct": measure(direct, "ecdsa-p256-sign", threads, seconds, warmup),
                 "members": {}}
    log(_line(out["direct"]))
    for n in members:
        labels = tokens.labels[:n]
        try:
            with p11p(tokens, root / f"p11p-{n}", f"p11p-modeled-{n}", labels, "balance",
                      rules={t: MODELED_RULES for t in labels}) as group:
                r = measure(group.target, "ecdsa-p256-sign", threads, seconds, warmup)
        except Exception as exc:  # the daemon did not start: say so, go on
            r = {"config": f"p11p-modeled-{n}", "ok": False, "error": str(exc)}
        out["members"][str(n)] = r
        log(_line(r))
    one = out["members"].get("1", {}).get("ops_per_s")
    out["scaling"] = {k: (v["ops_per_s"] / one if one and v.get("ops_per_s") else None)
                      for k, v in out["members"].items()}
    return out


def failover(tokens: Tokens, root: Path, threads: int, seconds: float, times: tuple[float, float, float],
             log=print) -> dict:
    """An ECDSA load on a two-member balance group (both behind faultsim, no delay) while
    member tokB fails: at times[0] every call answers CKR_DEVICE_ERROR; at times[1] the
    rule goes (the member recovers); at times[2], once it is back, its helpers are killed."""
    labels = tokens.labels[:2]
    failing = labels[1]
    events: list[dict] = []
    fault_log = root / "faults.log"
    with p11p(tokens, root, "p11p-failover", labels, "balance", rules={t: "" for t in labels},
              settings=FAILOVER_SETTINGS, fault_log=fault_log) as group:
        target = group.target
        proc = subprocess.Popen(
            target.args() + ["--op", "ecdsa-p256-sign", "--threads", str(threads), "--seconds",
                             str(seconds), "--warmup", "0.5", "--timeline"],
            env=target.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            t0 = _wait_measuring(proc)
            _at(t0 + times[0])
            group.set_rules(failing, "* error rv=CKR_DEVICE_ERROR\n")
            events.append({"t": time.monotonic() - t0, "what": f"{failing}: CKR_DEVICE_ERROR on every call"})
            state = _wait_state(group, failing, ("FAILED", "RECOVERING"), 10)
            events[-1]["member_state"] = state
            _at(t0 + times[1])
            group.set_rules(failing, "")
            events.append({"t": time.monotonic() - t0, "what": f"{failing}: rule removed"})
            events[-1]["member_state"] = _wait_state(group, failing, ("OK",), 15)
            _at(t0 + times[2])
            killed = group.helpers(failing)
            for pid in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            events.append({"t": time.monotonic() - t0, "what": f"{failing}: helpers killed",
                           "pids": killed})
            events[-1]["member_state"] = _wait_state(group, failing, ("FAILED", "RECOVERING"), 1)
            stdout, _ = proc.communicate(timeout=seconds + 120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result = parse(stdout, "failover run")
    result["config"] = "p11p-failover"
    timeline = result.get("timeline", [])
    # the calls an event affected end between it and the next event (timeline: per second)
    bounds = [int(e["t"]) for e in events] + [len(timeline)]
    for i, event in enumerate(events):
        window = timeline[bounds[i]:max(bounds[i + 1], bounds[i] + 1)]
        event["max_us"] = max((s[2] for s in window), default=None)
        event["errors"] = sum(s[1] for s in window)
    failure_events = [e for e in events if "rule removed" not in e["what"]]
    affected = [e["max_us"] for e in failure_events if e["max_us"] is not None]
    faults = fault_log.read_text().splitlines() if fault_log.exists() else []
    return {"threads": threads, "op": "ecdsa-p256-sign", "events": events, "run": result,
            "faults_injected": len(faults),
            "app_errors": result.get("errors"),
            "affected_max_us": max(affected) if affected else None,
            "p99_us": result.get("p99_us"), "max_us": result.get("max_us")}


# What every short-lived application of the start-up section does, as issue 13 names it
# (`pkcs11-tool -O`): list the token's public objects, no login.
TOOL_ARGS = ("-O",)


def startup(tokens: Tokens, root: Path, runs: int, starts: int, settle: float = 1.0,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """`runs` short-lived `pkcs11-tool --token-label L -O` one after
    the other through p11-kit's remoting, through p11p (a fresh one-member daemon with
    the default fork server, whose CPU, and its helpers', is measured less an idle
    daemon's) and on the module directly; and a helper's start through the fork server,
    `starts` times. `settle`: helper_costs.cpu_per_app's."""
    import helper_costs  # imports p11p: here, so that only this section needs it

    if shutil.which("pkcs11-tool") is None:
        raise RuntimeError("pkcs11-tool is not installed (Debian's opensc): not measured")
    token = tokens.labels[0]
    out: dict[str, Any] = {"runs": runs, "command": "pkcs11-tool --module MODULE --token-label "
                           "LABEL " + " ".join(TOOL_ARGS)}
    with p11kit(tokens, root / "p11-kit", token) as remote:
        out["p11-kit"] = helper_costs.tool_runs(remote.module, ["--token-label", token,
                                                                *TOOL_ARGS], remote.env, runs)
    log(_tool_line("p11-kit", out["p11-kit"]))
    out["p11p"] = helper_costs.cpu_per_app(root / "p11p", tokens.hsm, runs, True, (token,),
                                           ("--token-label", "bench", *TOOL_ARGS), settle)
    log(_tool_line("p11p", out["p11p"]) +
        f"; daemon and helper CPU {out['p11p']['cpu_ms_per_app']:.1f} ms per application")
    out["direct"] = helper_costs.tool_runs(SOFTHSM_SO, ["--token-label", token, *TOOL_ARGS],
                                           tokens.hsm.env, runs)
    log(_tool_line("direct", out["direct"]))
    times = [t * 1000 for t in asyncio.run(helper_costs.starts(tokens.hsm, starts, True))]
    out["helper_start_ms"] = {"median": statistics.median(times), "min": min(times),
                              "max": max(times), "n": len(times), "fork_server": True}
    log(f"  helper start to its ready frame (fork server): median "
        f"{out['helper_start_ms']['median']:.1f} ms of {len(times)}")
    return out


def _tool_line(name: str, r: dict[str, Any]) -> str:
    failed = f", {r['failures']} failed: {r['error']}" if r["failures"] else ""
    return f"  {name:<8} {r['runs']} × pkcs11-tool: {r['wall_s']:.2f} s{failed}"


def footprint(tokens: Tokens, root: Path, apps: int, sessions: int, pss_apps: int,
              settle: float = 1.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """VmRSS of the daemon and its helpers, idle and with `apps` applications holding
    `sessions` open sessions each (one-member group); then the helpers' average PSS with
    `pss_apps` applications on a two-member group (helper_costs.helper_pss). `settle`:
    seconds for the warm pool to fill, and the applications' helpers to start."""
    import helper_costs

    with p11p(tokens, root, "p11p-footprint", tokens.labels[:1], "failover") as group:
        time.sleep(settle)  # the warm pool fills
        idle = _rss_snapshot(group)
        holders: list[Holder] = []
        try:
            for _ in range(apps):
                holders.append(Holder(group.target, sessions))
            time.sleep(settle / 2)
            loaded = _rss_snapshot(group)
        finally:
            for h in holders:
                h.release()
    loaded["apps"], loaded["sessions"] = apps, apps * sessions
    try:
        pss = helper_costs.helper_pss(root / "pss", tokens.hsm, pss_apps, True,
                                      tuple(tokens.labels[:2]), settle)
    except Exception as exc:  # the RSS figures stand without it
        pss = {"apps": pss_apps, "error": f"{type(exc).__name__}: {exc}"}
    return {"idle": idle, "loaded": loaded, "pss": pss}


def _rss_snapshot(group) -> dict:
    helpers = {pid: rss_mb(pid) for pid in group.helpers()}
    sizes = [v for v in helpers.values() if v is not None]
    return {"member_sessions": sum(m.get("sessions", 0) for m in group.members()),"daemon_mb": rss_mb(group.daemon.pid), "helpers": len(helpers),
            "helper_max_mb": max(sizes, default=None), "helper_min_mb": min(sizes, default=None),
            "helpers_total_mb": sum(sizes) if sizes else None}


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB (MiB), from /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _wait_measuring(proc: subprocess.Popen) -> float:
    """The moment p11bench starts measuring (it says so on stderr with --timeline)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if "p11bench: measuring" in line:
            t0 = time.monotonic()
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return t0
    raise RuntimeError(f"p11bench ended before measuring: {proc.wait()} {proc.stdout.read() if proc.stdout else ''}")


def _at(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _wait_state(group, member: str, states: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        state = group.member_states().get(member, "?")
        if state in states:
            return state
        time.sleep(0.05)
    return state


def _line(r: dict) -> str:
    if r.get("ops_per_s") is None:
        return f"  {r.get('config')}: failed: {r.get('error')}"
    return (f"  {r['config']:<18} {r['op']:<16} {r['threads']:>2} threads "
            f"{r['ops_per_s']:>10.1f} ops/s  p50 {r['p50_us']:.0f} µs  p99 {r['p99_us']:.0f} µs"
            f"  errors {r['errors']}")
