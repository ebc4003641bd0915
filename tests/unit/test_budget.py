"""One deadline per application call (daemon/budget.py, DESIGN invariant 2): what the
budget gives each wait, holding, and the grace after a member outlived the deadline."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from p11p.daemon import budget
from p11p.daemon.budget import FAILOVER_SHARE, CallBudget


def _group(call_timeout: float = 2.0, hold_timeout: float = 3.0) -> Any:
    return SimpleNamespace(config=SimpleNamespace(call_timeout=call_timeout,
                                                  hold_timeout=hold_timeout))


def test_the_deadline_is_call_timeout_from_arrival() -> None:
    b = CallBudget(arrival=100.0)
    assert b.deadline(_group()) == 102.0
    assert CallBudget().remaining(_group()) <= 2.0


def test_holding_moves_the_deadline_but_never_past_the_limit() -> None:
    g = _group()
    b = CallBudget(arrival=time.monotonic())
    until = b.hold_until(g)
    assert until <= b.arrival + 2.0 + 3.0 + 0.01
    b.held(g, 1.0)
    assert abs(b.deadline(g) - (b.arrival + 3.0)) < 1e-9
    b.held(g, 10.0)
    assert abs(b.deadline(g) - (b.arrival + 5.0)) < 1e-9  # arrival + call + hold


def test_a_member_time_out_gives_one_grace_within_the_limit() -> None:
    g = _group()
    b = CallBudget(arrival=time.monotonic() - 2.0)  # the deadline is now
    b.member_timed_out(g)
    first = b.deadline(g)
    assert first >= time.monotonic() + FAILOVER_SHARE * 2.0 - 0.05
    b.member_timed_out(g)  # once only
    assert b.deadline(g) == first
    late = CallBudget(arrival=time.monotonic() - 4.9)  # the limit is near: no more than it
    late.member_timed_out(g)
    assert late.deadline(g) <= late.arrival + 5.0 + 1e-9


def test_a_carried_call_keeps_the_first_arrival() -> None:
    g = _group()
    b = CallBudget()
    then = b.arrival - 2.0
    b.carried((then, b.arrival - 0.01), g)
    assert b.arrival == then
    assert b.deadline(g) <= time.monotonic() + FAILOVER_SHARE * 2.0 + 0.01
    stale = CallBudget()  # a report long before: the call is a new one
    stale.carried((stale.arrival - 12.0, stale.arrival - 10.0), g)
    assert stale.deadline(g) == stale.arrival + 2.0


def test_outside_a_call_each_use_gets_a_fresh_budget() -> None:
    assert budget.current() is not budget.current()
    token = budget.begin()
    try:
        assert budget.current() is budget.current()
    finally:
        budget.end(token)
