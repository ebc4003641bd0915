"""Writes what a benchmark run measured: results.json (every figure), results.md (the
tables a reader wants: the targets, issue 13's first), and the ratios p11p/direct and
p11p/p11-kit per operation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from targets import GROUPS, find_run, ratio

CONFIGS = ("direct", "p11p", "p11p-balance", "p11-kit")
TITLES = {"direct": "SoftHSM2 direct", "p11p": "p11p (1 member)",
          "p11p-balance": "p11p (2 members, balance)", "p11-kit": "p11-kit remoting"}


def ratios(results: dict) -> list[dict]:
    """Per operation and thread count: each p11p configuration against direct and p11-kit."""
    m = results.get("matrix", {})
    out = []
    for op in m.get("ops", []):
        for threads in m.get("threads", []):
            row: dict = {"op": op, "threads": threads}
            direct = find_run(results, "direct", op, threads)
            kit = find_run(results, "p11-kit", op, threads)
            for config in ("p11p", "p11p-balance"):
                mine = find_run(results, config, op, threads)
                row[f"{config}/direct"] = ratio(mine, direct)
                row[f"{config}/p11-kit"] = ratio(mine, kit)
                row[f"{config}/p11-kit p50"] = ratio(mine, kit, "p50_us")
            out.append(row)
    return out


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


def _ops(run: dict | None) -> str:
    if run is None:
        return "—"
    if run.get("ops_per_s") is None:
        return f"✗ {run.get('error', 'no result')}"[:60]
    if run.get("errors"):
        kinds = run.get("error_kinds") or [{}]
        first = f"{kinds[0].get('call', '?')} {kinds[0].get('rv', '?')}"
        return f"✗ {run['errors']} errors ({first})" if not run.get("ops") else \
            f"{run['ops_per_s']:,.0f} ✗ {run['errors']} errors ({first})"
    return f"{run['ops_per_s']:,.0f}"


def _lat(run: dict | None) -> str:
    if run is None or run.get("p50_us") is None or not run.get("ops"):
        return "—"
    return f"{run['p50_us']:,.0f} / {run['p99_us']:,.0f}"


def _load(avg: list[float] | None) -> str:
    return f"{avg[0]:.2f}" if avg else "?"


def _x(v: float | None) -> str:
    return f"{v:.2f}×" if v is not None else "—"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    m = results.get("matrix", {})
    configs = [c for c in CONFIGS if c in m.get("configs", [])]
    repeat = f" · best of {m['repeat']} runs" if (m.get("repeat") or 1) > 1 else ""
    lines = ["# p11p benchmark", "",
             f"{meta.get('date', '')} · {meta.get('cpus', '?')} CPUs · {meta.get('kernel', '')} · "
             f"{m.get('seconds', '?')} s per run after {m.get('warmup', '?')} s warm-up"
             f"{repeat}"
             f"{' · quick run' if meta.get('quick') else ''} · load average "
             f"{_load(meta.get('load_average_start'))} at the start, "
             f"{_load(meta.get('load_average_end'))} at the end · commit {meta.get('commit', '?')}",
             ""]
    lines += ["## Targets", ""]
    for group in GROUPS:
        lines += [f"### {group[0].upper()}{group[1:]}", ""]
        lines += _table(["target", "wanted", "measured", "result"],
                        [[t["name"], t["target"], t["shown"], t["status"]]
                         for t in results.get("targets", []) if t.get("group") == group])
    if m:  # the matrix ran
        lines += ["## Operations: throughput (ops/s)", "",
                  "Each thread has its own session and repeats the operation; a ✗ cell had errors "
                  "(the first kind is named).", ""]
        rows = []
        by_key = {(r["op"], r["threads"]): r for r in results.get("ratios", [])}
        for op in m.get("ops", []):
            for threads in m.get("threads", []):
                rt = by_key.get((op, threads), {})
                rows.append([op, str(threads)] +
                            [_ops(find_run(results, c, op, threads)) for c in configs] +
                            [_x(rt.get("p11p/direct")), _x(rt.get("p11p/p11-kit")),
                             _x(rt.get("p11p-balance/direct")), _x(rt.get("p11p-balance/p11-kit"))])
        lines += _table(["operation", "threads"] + [TITLES[c] for c in configs] +
                        ["p11p/direct", "p11p/p11-kit", "balance/direct", "balance/p11-kit"], rows)
        lines += ["## Operations: latency p50 / p99 (µs)", ""]
        rows = [[op, str(t)] + [_lat(find_run(results, c, op, t)) for c in configs]
                for op in m.get("ops", []) for t in m.get("threads", [])]
        lines += _table(["operation", "threads"] + [TITLES[c] for c in configs], rows)
    lines += _modeled(results.get("modeled"))
    lines += _failover(results.get("failover"))
    lines += _startup(results.get("startup"))
    lines += _footprint(results.get("footprint"))
    errors = results.get("section_errors", {})
    if errors:
        lines += ["## Sections that did not run", ""]
        lines += [f"- {k}: {v}" for k, v in errors.items()] + [""]
    return "\n".join(lines)


def _modeled(mo: dict | None) -> list[str]:
    if not mo:
        return []
    lines = ["## Modeled HSMs", "",
             f"Each member behind p11p-faultsim.so with `{mo['rules'].strip().replace(chr(10), '`, `')}`"
             f" (per helper process); {mo['threads']}-thread {mo['op']}, balance.", ""]
    rows = [["one modeled HSM in the application (no p11p)", _ops(mo.get("direct")),
             _lat(mo.get("direct")), "—"]]
    for n, run in mo.get("members", {}).items():
        rows.append([f"p11p, {n} member{'s' if n != '1' else ''}", _ops(run), _lat(run),
                     _x(mo.get("scaling", {}).get(n))])
    return lines + _table(["configuration", "ops/s", "p50 / p99 µs", "vs 1 member"], rows)


def _failover(fo: dict | None) -> list[str]:
    if not fo:
        return []
    run = fo.get("run", {})
    lines = ["## Failover", "",
             f"{fo['threads']}-thread {fo['op']} on a two-member balance group (both behind "
             f"p11p-faultsim.so, no delay); {fo.get('faults_injected', 0)} faults injected. "
             f"Application: {run.get('ops', 0):,} operations, {fo.get('app_errors')} errors, "
             f"p99 {run.get('p99_us', 0):,.0f} µs, max {run.get('max_us', 0):,.0f} µs.", ""]
    rows = [[f"{e['t']:.1f} s", e["what"], e.get("member_state", ""),
             f"{e['max_us'] / 1000:.1f} ms" if e.get("max_us") is not None else "—",
             str(e.get("errors", ""))] for e in fo.get("events", [])]
    lines += _table(["at", "event", "member then", "max latency until next event", "errors"], rows)
    timeline = run.get("timeline") or []
    if timeline:
        lines += ["Per second: " + ", ".join(f"{s[0]} ops/{s[2] / 1000:.0f} ms max"
                                             for s in timeline), ""]
    return lines


def _startup(st: dict[str, Any] | None) -> list[str]:
    if not st:
        return []
    lines = ["## Start-up of short-lived applications", "",
             f"`{st.get('command')}`, {st.get('runs')} times one after the other. p11p: a "
             "fresh one-member daemon (fork server on); its CPU and its helpers' (reaped "
             "descendants) less an idle daemon's, per application.", ""]
    rows = []
    for name in ("direct", "p11-kit", "p11p"):
        r = st.get(name)
        if not r:
            continue
        runs = r.get("runs") or 1
        cpu = f"{r['cpu_ms_per_app']:.1f} ms" if r.get("cpu_ms_per_app") is not None else "—"
        rows.append([TITLES.get(name, name).replace(" (1 member)", ""), f"{r['wall_s']:.2f} s",
                     f"{r['wall_s'] / runs * 1000:.0f} ms", str(r.get("failures")), cpu])
    lines += _table(["configuration", "wall time", "per application", "failed",
                     "daemon + helper CPU per application"], rows)
    hs = st.get("helper_start_ms")
    if hs:
        lines += [f"A helper's start through the fork server, to its ready frame: median "
                  f"{hs['median']:.1f} ms (min {hs['min']:.1f}, max {hs['max']:.1f}, "
                  f"n = {hs['n']}).", ""]
    return lines


def _footprint(fp: dict | None) -> list[str]:
    if not fp:
        return []
    idle, loaded = fp.get("idle", {}), fp.get("loaded", {})

    def mb(v: float | None) -> str:
        return f"{v:.1f} MB" if v is not None else "—"

    rows = [["idle", mb(idle.get("daemon_mb")), str(idle.get("helpers")),
             mb(idle.get("helper_max_mb")), mb(idle.get("helpers_total_mb")),
             str(idle.get("member_sessions"))],
            [f"{loaded.get('apps')} applications × {loaded.get('sessions', 0) // max(loaded.get('apps') or 1, 1)} sessions",
             mb(loaded.get("daemon_mb")), str(loaded.get("helpers")),
             mb(loaded.get("helper_max_mb")), mb(loaded.get("helpers_total_mb")),
             str(loaded.get("member_sessions"))]]
    lines = ["## Footprint (VmRSS)", "", "One-member group; each application holds its "
             "sessions open (each used once).", ""] + _table(
        ["load", "daemon", "helpers", "largest helper", "all helpers", "member sessions"], rows)
    pss = fp.get("pss")
    if pss:
        lines += ["## Helpers' PSS", ""]
        if pss.get("mean_mb") is None:
            lines += [f"Not measured: {pss.get('error', 'no helper')}", ""]
        else:
            lines += [f"{pss['apps']} applications (a session each, not logged in) on a "
                      f"{pss.get('members', 2)}-member group: {pss['helpers']} helpers, PSS "
                      f"(/proc/PID/smaps_rollup) average {pss['mean_mb']:.2f} MB, min "
                      f"{pss['min_mb']:.2f}, max {pss['max_mb']:.2f}.", ""]
    return lines
