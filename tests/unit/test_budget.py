"""One deadline per application call (daemon/budget.py, DESIGN invariant 2): what the
budget gives each wait, holding, and the part kept to fail over from a hung member."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from p11p.daemon import budget
from p11p.daemon.budget import FAILOVER_SHARE, CallBudget, member_limit


def _group(call_timeout: float = 2.0, hold_timeout: float = 3.0, members: int = 2) -> Any:
    return SimpleNamespace(config=SimpleNamespace(call_timeout=call_timeout,
                                                  hold_timeout=hold_timeout),
                           members=[object()] * members)


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


def test_a_member_gets_the_call_less_the_failover_part() -> None:
    g = _group()
    now = time.monotonic()
    b = CallBudget(arrival=now)
    assert abs(b.member_deadline(g) - (now + 2.0 * (1 - FAILOVER_SHARE))) < 1e-9
    assert abs(member_limit(g) - 2.0 * (1 - FAILOVER_SHARE)) < 1e-9
    b.member_timed_out(g)  # hung: the next member gets the rest, never past the deadline
    assert b.member_deadline(g) == b.deadline(g) == now + 2.0
    alone = _group(members=1)  # nowhere to fail over: the member gets it all
    assert CallBudget(arrival=now).member_deadline(alone) == now + 2.0
    assert member_limit(alone) == 2.0


def test_a_call_that_spent_its_time_elsewhere_gives_its_member_the_rest() -> None:
    g = _group()
    b = CallBudget(arrival=time.monotonic() - 1.2)  # less than FAIR_SHARE before the cut
    assert b.member_deadline(g) == b.deadline(g)


def test_a_carried_call_keeps_the_first_arrival() -> None:
    g = _group()
    b = CallBudget()
    then = b.arrival - 2.0
    b.carried((then, b.arrival - 0.01), g)
    assert b.arrival == then
    assert b.deadline(g) == then + 2.0  # the first arrival's, its member timed out
    assert b.member_deadline(g) == b.deadline(g)
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
