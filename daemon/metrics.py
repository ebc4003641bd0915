"""Counters for `p11p status --prometheus`: per member calls, errors by CK_RV and a
latency histogram; per group failovers, replays and recoveries. Cheap enough for the
call path: two clock reads and one bisect per member call.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING

from p11p.protocol.constants import rv_name

if TYPE_CHECKING:
    from p11p.daemon.members import Group

# seconds; the last bucket is +Inf
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MemberMetrics:
    __slots__ = ("errors", "buckets", "latency_sum")

    def __init__(self) -> None:
        self.errors: Counter[int] = Counter()
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe(self, seconds: float, rv: int) -> None:
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        if rv:
            self.errors[rv] += 1


class GroupMetrics:
    __slots__ = ("failovers", "replays", "recoveries")

    def __init__(self) -> None:
        self.failovers = 0
        self.replays = 0
        self.recoveries = 0


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(groups: list[Group]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")

    family("p11p_member_calls_total", "counter", "Calls sent to the member.")
    for g in groups:
        for m in g.members:
            out.append(f'p11p_member_calls_total{{group="{_label(g.label)}",member="{_label(m.name)}"}} '
                       f"{m.health.calls_served}")
    family("p11p_member_errors_total", "counter", "Calls that returned a CK_RV other than CKR_OK.")
    for g in groups:
        for m in g.members:
            for rv, n in sorted(m.metrics.errors.items()):
                out.append(f'p11p_member_errors_total{{group="{_label(g.label)}",member="{_label(m.name)}",'
                           f'rv="{rv_name(rv)}"}} {n}')
    family("p11p_member_up", "gauge", "1 while the member is in rotation (OK or DRAINING).")
    for g in groups:
        for m in g.members:
            out.append(f'p11p_member_up{{group="{_label(g.label)}",member="{_label(m.name)}",'
                       f'state="{m.health.state.value}"}} {1 if m.health.usable else 0}')
    family("p11p_member_call_seconds", "histogram", "Latency of member calls.")
    for g in groups:
        for m in g.members:
            labels = f'group="{_label(g.label)}",member="{_label(m.name)}"'
            total = 0
            for bound, n in zip((*BUCKETS, float("inf")), m.metrics.buckets, strict=True):
                total += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'p11p_member_call_seconds_bucket{{{labels},le="{le}"}} {total}')
            out.append(f"p11p_member_call_seconds_sum{{{labels}}} {m.metrics.latency_sum:.6f}")
            out.append(f"p11p_member_call_seconds_count{{{labels}}} {total}")
    for name, attr, text in (("p11p_group_failovers_total", "failovers", "Sessions moved off a failed member."),
                             ("p11p_group_replays_total", "replays", "Sessions rebuilt by replay."),
                             ("p11p_group_recoveries_total", "recoveries", "Members put back in rotation.")):
        family(name, "counter", text)
        for g in groups:
            out.append(f'{name}{{group="{_label(g.label)}"}} {getattr(g.metrics, attr)}')
    return "\n".join(out) + "\n"
