"""The targets, checked against one run's figures: each gives the measured value and PASS,
FALLS SHORT, or NOT MEASURED (a quick run measures only a subset; a figure the reference
configuration cannot produce, p11-kit's AES-GCM say, is not measured either, and says
why). Issue 13's targets come first, then the earlier ones. With --repeat, each matrix
cell holds its best run (run.py), so the ratios are of best runs; the cells of the
targets against the direct module always take three tries at least (run.py,
VS_DIRECT_CELLS), and show the ratio of their medians too."""

from __future__ import annotations

from typing import Any

PASS, SHORT, MISSING = "PASS", "FALLS SHORT", "NOT MEASURED"
ISSUE_13, EARLIER = "issue 13", "earlier targets"
GROUPS = (ISSUE_13, EARLIER)

# The operations of issue 13's table, and the two kept from before (sign-twocall, find):
# every one of them is in the full matrix, and in the first target's lines; and
# open-use-close, which shows what a session's open costs through p11p when the session
# is used (it is opened at its first call), matrix only.
OPERATIONS = ["random-32", "session-info", "sha256-1k", "sha256-4x256", "aes-gcm-1k",
              "aes-cbc-1k", "aes-ecb-1k", "ecdsa-p256-sign", "ecdsa-p256-verify",
              "rsa2048-sign", "sign-twocall", "open-close", "find"]
MATRIX_ONLY = ["open-use-close"]


def find_run(results: dict[str, Any], config: str, op: str, threads: int) -> dict[str, Any] | None:
    for r in results.get("matrix", {}).get("runs", []):
        if r.get("config") == config and r.get("op") == op and r.get("threads") == threads:
            return dict(r)
    return None


def clean(run: dict[str, Any] | None) -> bool:
    """A run that did its work: operations done, no error."""
    return bool(run) and run.get("errors") == 0 and (run.get("ops") or 0) > 0  # type: ignore[union-attr]


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None,
          key: str = "ops_per_s") -> float | None:
    if not (clean(a) and clean(b)) or not b[key]:  # type: ignore[index]
        return None
    return float(a[key]) / float(b[key])  # type: ignore[index]


def failure(run: dict[str, Any]) -> str:
    """What went wrong in a run that is not clean, in a few words."""
    if run.get("ops_per_s") is None:
        return f"failed: {run.get('error', 'no result')} {run.get('rv', '')}".strip()[:90]
    kinds = run.get("error_kinds") or [{}]
    first = f"{kinds[0].get('call', '?')} {kinds[0].get('rv', '?')}"
    return f"{run.get('errors')} errors ({first})" if run.get("ops") else f"no operation done ({first})"


def _check(name: str, target: str, value: Any, ok: bool | None, shown: str,
           group: str = EARLIER) -> dict[str, Any]:
    status = MISSING if value is None else (PASS if ok else SHORT)
    return {"name": name, "group": group, "target": target, "measured": value,
            "shown": shown if value is not None else "—", "status": status}


def _result(name: str, target: str, status: str, value: Any, shown: str,
            group: str) -> dict[str, Any]:
    return {"name": name, "group": group, "target": target, "measured": value, "shown": shown,
            "status": status}


def _x(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "—"


def _ops(run: dict[str, Any]) -> str:
    return f"{run['ops_per_s']:,.0f}"


def _why_not(results: dict[str, Any], section: str, configs: tuple[str, ...] = ()) -> str:
    """Why a section's figure is missing, when something says so: the section failed, or
    (matrix) a configuration did not start; else "—" (not in this run's plan)."""
    error = results.get("section_errors", {}).get(section)
    if error:
        return f"{section} did not run: {error}"[:160]
    not_started = results.get(section, {}).get("not_started", {})
    for config in configs:
        if config in not_started:
            return f"{config} did not start: {not_started[config]}"[:160]
    return "—"


def _compare(name: str, target: str, mine: dict[str, Any] | None, theirs: dict[str, Any] | None,
             want: float, group: str, labels: tuple[str, str], key: str = "ops_per_s",
             at_most: bool = False, why_not: str = "—") -> dict[str, Any]:
    """mine[key] / theirs[key] against `want` (≥, or ≤ with at_most). Not run: NOT
    MEASURED (`why_not` says why, if known). Errors in `mine` (the p11p side): FALLS
    SHORT. Errors in `theirs` (the reference): NOT MEASURED, saying why."""
    if mine is None or theirs is None:
        return _result(name, target, MISSING, None, why_not, group)
    if not clean(mine):
        return _result(name, target, SHORT, None, f"{labels[0]}: {failure(mine)}", group)
    if not clean(theirs):
        return _result(name, target, MISSING, None,
                       f"{labels[1]} cannot: {failure(theirs)}; {labels[0]} {_ops(mine)} ops/s",
                       group)
    value = ratio(mine, theirs, key)
    if value is None:  # theirs measured 0
        return _result(name, target, MISSING, None, f"{labels[1]}: {key} 0", group)
    ok = value <= want if at_most else value >= want
    unit, digits = ("µs", 1) if key.endswith("_us") else ("ops/s", 0)
    shown = (f"{value:.2f}× ({labels[0]} {mine[key]:,.{digits}f} {unit}, "
             f"{labels[1]} {theirs[key]:,.{digits}f})")
    tries = len(mine.get("tries_ops_per_s") or [])
    if key == "ops_per_s" and tries > 1 and mine.get("median_ops_per_s") and theirs.get("median_ops_per_s"):
        shown += (f"; best of {tries} tries each, their medians "
                  f"{float(mine['median_ops_per_s']) / float(theirs['median_ops_per_s']):.2f}×")
    return _result(name, target, PASS if ok else SHORT, round(value, 3), shown, group)


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    return issue_13(results) + earlier(results)


def issue_13(results: dict[str, Any]) -> list[dict[str, Any]]:
    g = ISSUE_13
    out = []
    vs_kit = _why_not(results, "matrix", ("p11p", "p11-kit"))
    vs_direct = _why_not(results, "matrix", ("p11p", "direct"))
    # 1. every operation, 1 and 8 threads: p11p at least p11-kit's ops/s
    for op in OPERATIONS:
        for threads in (1, 8):
            out.append(_compare(f"{op}, {_threads(threads)}: p11p ops/s vs p11-kit", "≥ 1.0×",
                                find_run(results, "p11p", op, threads),
                                find_run(results, "p11-kit", op, threads), 1.0, g,
                                ("p11p", "p11-kit"), why_not=vs_kit))
    # 2. at 8 threads: the cheap calls 5× p11-kit; signing 0.8× the module used directly
    for op in ("random-32", "session-info", "sha256-1k"):
        out.append(_compare(f"{op}, 8 threads: p11p ops/s vs p11-kit", "≥ 5.0×",
                            find_run(results, "p11p", op, 8), find_run(results, "p11-kit", op, 8),
                            5.0, g, ("p11p", "p11-kit"), why_not=vs_kit))
    for op in ("ecdsa-p256-sign", "rsa2048-sign"):
        out.append(_compare(f"{op}, 8 threads: p11p ops/s vs direct module", "≥ 0.8×",
                            find_run(results, "p11p", op, 8), find_run(results, "direct", op, 8),
                            0.8, g, ("p11p", "direct"), why_not=vs_direct))
    # 3. AES-GCM through p11p against AES-ECB through p11-kit (which refuses GCM)
    for threads in (1, 8):
        out.append(_compare(f"aes-gcm-1k through p11p vs aes-ecb-1k through p11-kit, "
                            f"{_threads(threads)}", "≥ 1.0×",
                            find_run(results, "p11p", "aes-gcm-1k", threads),
                            find_run(results, "p11-kit", "aes-ecb-1k", threads), 1.0, g,
                            ("p11p gcm", "p11-kit ecb"), why_not=vs_kit))
    out += _startup(results.get("startup", {}), _why_not(results, "startup"))
    out.append(_pss(results.get("footprint", {}).get("pss"), _why_not(results, "footprint")))
    out += _failover(results.get("failover", {}), _why_not(results, "failover"))
    return out


def _startup(st: dict[str, Any], why_not: str) -> list[dict[str, Any]]:
    g = ISSUE_13
    runs = st.get("runs")
    name = "50 short-lived pkcs11-tool -O: p11p wall time vs p11-kit"
    mine, theirs = st.get("p11p"), st.get("p11-kit")
    note = f" ({runs} runs)" if runs and runs != 50 else ""
    if not mine or not theirs:
        line = _result(name, "≤ 1.5×", MISSING, None, why_not, g)
    elif mine.get("failures"):
        line = _result(name, "≤ 1.5×", SHORT, None,
                       f"p11p: {mine['failures']} of {runs} failed ({mine.get('error')})", g)
    elif theirs.get("failures"):
        line = _result(name, "≤ 1.5×", MISSING, None,
                       f"p11-kit: {theirs['failures']} of {runs} failed ({theirs.get('error')})", g)
    else:
        value = mine["wall_s"] / theirs["wall_s"]
        line = _result(name, "≤ 1.5×", PASS if value <= 1.5 else SHORT, round(value, 3),
                       f"{value:.2f}× (p11p {mine['wall_s']:.2f} s, p11-kit "
                       f"{theirs['wall_s']:.2f} s){note}", g)
    cpu = mine.get("cpu_ms_per_app") if mine and not mine.get("failures") else None
    cpu_line = _check("daemon and helper CPU per application start (pkcs11-tool -O)",
                      "≤ 10 ms", cpu, cpu is not None and cpu <= 10,
                      f"{cpu:.1f} ms{note}" if cpu is not None else "", g)
    if cpu is None and not mine:
        cpu_line["shown"] = why_not
    return [line, cpu_line]


def _pss(pss: dict[str, Any] | None, why_not: str) -> dict[str, Any]:
    name = "20 applications on a two-member group: helpers' average PSS"
    mean = (pss or {}).get("mean_mb")
    if not pss:
        return _result(name, "≤ 4 MB", MISSING, None, why_not, ISSUE_13)
    if pss and mean is None:
        return _result(name, "≤ 4 MB", MISSING, None, str(pss.get("error", "no helper")),
                       ISSUE_13)
    shown = f"{mean:.2f} MB ({pss['helpers']} helpers, {pss['apps']} applications)" \
        if pss and mean is not None else ""
    return _check(name, "≤ 4 MB", mean, mean is not None and mean <= 4, shown, ISSUE_13)


def _failover(fo: dict[str, Any], why_not: str) -> list[dict[str, Any]]:
    g = ISSUE_13
    names = ("failover under an 8-thread load: errors seen by the application",
             "failover under an 8-thread load: slowest call of the run")
    threads = fo.get("threads")
    if threads is not None and threads != 8:  # not the load the target names
        return [_result(n, t, MISSING, None, f"measured with {threads} threads", g)
                for n, t in zip(names, ("0", "≤ 200 ms"), strict=True)]
    if not fo:
        return [_result(n, t, MISSING, None, why_not, g)
                for n, t in zip(names, ("0", "≤ 200 ms"), strict=True)]
    errors, slowest = fo.get("app_errors"), fo.get("max_us")
    return [_check(names[0], "0", errors, errors == 0, str(errors), g),
            _check(names[1], "≤ 200 ms", slowest, slowest is not None and slowest <= 200_000,
                   f"{slowest / 1000:.1f} ms" if slowest is not None else "", g)]


def earlier(results: dict[str, Any]) -> list[dict[str, Any]]:
    g = EARLIER
    vs_kit = _why_not(results, "matrix", ("p11p", "p11-kit"))
    out = [_compare("random-32, 1 thread: p11p p50 vs p11-kit p50", "≤ 2.0×",
                    find_run(results, "p11p", "random-32", 1),
                    find_run(results, "p11-kit", "random-32", 1), 2.0, g, ("p11p", "p11-kit"),
                    key="p50_us", at_most=True, why_not=vs_kit)]
    for threads in (1, 8):
        out.append(_compare(f"find, {_threads(threads)}: p11p ops/s vs p11-kit", "≥ 2.0×",
                            find_run(results, "p11p", "find", threads),
                            find_run(results, "p11-kit", "find", threads), 2.0, g,
                            ("p11p", "p11-kit"), why_not=vs_kit))
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
    worst = results.get("failover", {}).get("affected_max_us")
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
