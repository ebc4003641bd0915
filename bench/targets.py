"""The issue's targets, checked against one run's figures: each gives the measured value
and PASS, FALLS SHORT, or NOT MEASURED (a quick run measures only a subset)."""

from __future__ import annotations

from typing import Any

PASS, SHORT, MISSING = "PASS", "FALLS SHORT", "NOT MEASURED"


def find_run(results: dict, config: str, op: str, threads: int) -> dict | None:
    for r in results.get("matrix", {}).get("runs", []):
        if r.get("config") == config and r.get("op") == op and r.get("threads") == threads:
            return r
    return None


def clean(run: dict | None) -> bool:
    """A run that did its work: operations done, no error."""
    return bool(run) and run.get("errors") == 0 and (run.get("ops") or 0) > 0  # type: ignore[union-attr]


def ratio(a: dict | None, b: dict | None, key: str = "ops_per_s") -> float | None:
    if not (clean(a) and clean(b)) or not b[key]:  # type: ignore[index]
        return None
    return float(a[key]) / float(b[key])  # type: ignore[index]


def _check(name: str, target: str, value: Any, ok: bool | None, shown: str) -> dict:
    status = MISSING if value is None else (PASS if ok else SHORT)
    return {"name": name, "target": target, "measured": value,
            "shown": shown if value is not None else "—", "status": status}


def _x(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "—"


def evaluate(results: dict) -> list[dict]:
    out = []
    ecdsa = ratio(find_run(results, "p11p", "ecdsa-p256-sign", 8),
                  find_run(results, "p11-kit", "ecdsa-p256-sign", 8))
    out.append(_check("ecdsa-p256-sign, 8 threads: p11p ops/s vs p11-kit", "≥ 1.0×", ecdsa,
                      ecdsa is not None and ecdsa >= 1.0, _x(ecdsa)))
    p50 = ratio(find_run(results, "p11p", "random-32", 1),
                find_run(results, "p11-kit", "random-32", 1), "p50_us")
    out.append(_check("random-32, 1 thread: p11p p50 vs p11-kit p50", "≤ 2.0×", p50,
                      p50 is not None and p50 <= 2.0, _x(p50)))
    for threads in (1, 8):
        f = ratio(find_run(results, "p11p", "find", threads),
                  find_run(results, "p11-kit", "find", threads))
        out.append(_check(f"find, {threads} thread{'s' if threads > 1 else ''}: p11p ops/s vs p11-kit",
                          "≥ 2.0×", f, f is not None and f >= 2.0, _x(f)))
    p11p_runs = [r for r in results.get("matrix", {}).get("runs", [])
                 if r.get("config") in ("p11p", "p11p-balance")]
    if p11p_runs:
        bad = sorted({f"{r['config']}/{r['op']}" for r in p11p_runs if not clean(r)})
        ops = sorted({r["op"] for r in p11p_runs})
        gcm = any(r["op"] == "aes-gcm-1k" for r in p11p_runs)
        shown = (f"{len(ops)} operations, {len(p11p_runs)} runs, no error" if not bad
                 else "errors in " + ", ".join(bad))
        if not gcm:
            shown += " (aes-gcm-1k not run)"
        out.append(_check("every operation works through p11p (incl. aes-gcm-1k)",
                          "0 errors", len(bad), not bad and gcm, shown))
    else:
        out.append(_check("every operation works through p11p (incl. aes-gcm-1k)", "0 errors",
                          None, None, ""))
    scaling = results.get("modeled", {}).get("scaling", {})
    for n, want in (("2", 1.8), ("3", 2.7)):
        s = scaling.get(n)
        out.append(_check(f"modeled HSMs: {n} members vs 1, 16-thread ECDSA ops/s",
                          f"≥ {want}×", s, s is not None and s >= want, _x(s)))
    fo = results.get("failover", {})
    errors = fo.get("app_errors")
    out.append(_check("failover: errors seen by the application", "0", errors, errors == 0,
                      str(errors)))
    worst = fo.get("affected_max_us")
    out.append(_check("failover: max latency of the affected calls", "≤ 200 ms", worst,
                      worst is not None and worst <= 200_000,
                      f"{worst / 1000:.1f} ms" if worst is not None else ""))
    loaded = results.get("footprint", {}).get("loaded", {})
    sessions = loaded.get("sessions")
    daemon, helper = loaded.get("daemon_mb"), loaded.get("helper_max_mb")
    with_sessions = f" ({sessions} sessions)" if sessions and sessions != 1000 else ""
    out.append(_check("daemon RSS with 1,000 sessions from 10 applications", "≤ 100 MB", daemon,
                      daemon is not None and daemon <= 100,
                      f"{daemon:.1f} MB{with_sessions}" if daemon is not None else ""))
    out.append(_check("one helper's RSS (largest, under that load)", "≤ 40 MB", helper,
                      helper is not None and helper <= 40,
                      f"{helper:.1f} MB" if helper is not None else ""))
    return out
