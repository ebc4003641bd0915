"""One deadline per application call (DESIGN, invariant 2).

A call's budget starts at its arrival (Dispatcher.dispatch) and is `call_timeout` of the
group it runs on: every wait inside the call (a helper's start, login, replay, each
member call, retries) draws from it. Two things move it:

- holding: while no member of the group is in service the call waits up to
  `hold_timeout`, and the time held is added to its deadline; the call's life never
  exceeds arrival + call_timeout + hold_timeout;
- failing over: in a group of several members, a member call (or a helper's start) may
  take call_timeout less FAILOVER_SHARE of it; past that the member counts as hung (its
  helper killed, the member failed) and the call has the rest to run on another member.
  So a hung member costs a call at most call_timeout, and a call that meets one is
  answered within it. A group of one member gives its member the whole budget.

The budget travels in a context variable: the router's methods, the context's helper
start and the data plane read it without every signature in between naming it. Code
that runs outside an application call (recovery, probes, drains) finds none and gets a
fresh budget per use: call_timeout from then.
"""

from __future__ import annotations

import contextvars
import time
from typing import TYPE_CHECKING

from p11p.daemon.errors import CKError
from p11p.protocol.constants import CKR

if TYPE_CHECKING:
    from p11p.daemon.members import Group

# In a group of several members, the part of call_timeout kept for running a call on
# another member after its first member outlived the rest (hung).
FAILOVER_SHARE = 1 / 3
# A member call (or helper start) that outlives the call's deadline fails the member when
# it was given at least this part of call_timeout: one that got only the rest of a call
# that spent its time elsewhere says nothing about the member (DESIGN, invariant 3), and
# just ends the call (CallExpired).
FAIR_SHARE = 0.25
# seconds within which a client's call after its report of a hung direct call continues it
CARRY_WINDOW = 1.0


class CallExpired(CKError):
    """The call's deadline passed before its next member call: answered
    CKR_DEVICE_ERROR, without blaming a member that was never asked."""

    def __init__(self) -> None:
        super().__init__(CKR["CKR_DEVICE_ERROR"], "call_timeout passed")


class CallBudget:
    """The deadline of one application call."""

    __slots__ = ("arrival", "_at", "_limit", "_failed_over")

    def __init__(self, arrival: float | None = None) -> None:
        self.arrival = time.monotonic() if arrival is None else arrival
        self._at: float | None = None
        self._limit: float | None = None
        self._failed_over = False

    def _fix(self, group: Group) -> float:
        if self._at is None:
            cfg = group.config
            self._at = self.arrival + cfg.call_timeout
            self._limit = self._at + cfg.hold_timeout
        return self._at

    def deadline(self, group: Group) -> float:
        """The monotonic time the call must be answered by (holding apart)."""
        return self._at if self._at is not None else self._fix(group)

    def remaining(self, group: Group) -> float:
        return max(0.0, self.deadline(group) - time.monotonic())

    def hold_until(self, group: Group) -> float:
        """How long a call may wait for a member to come back into service."""
        self._fix(group)
        assert self._limit is not None
        return min(time.monotonic() + group.config.hold_timeout, self._limit)

    def held(self, group: Group, seconds: float) -> None:
        """The call waited `seconds` with no member in service: not drawn from it."""
        self._fix(group)
        assert self._at is not None and self._limit is not None
        self._at = min(self._at + seconds, self._limit)

    def member_deadline(self, group: Group) -> float:
        """The monotonic time a member call (or helper start) must be answered by: in a
        group of several members, before the call's own deadline by FAILOVER_SHARE of
        call_timeout, until a member has timed out in this call (or when that would
        leave the member less than FAIR_SHARE: no hang could be told then)."""
        at = self.deadline(group)
        if self._failed_over or len(group.members) < 2:
            return at
        cut = at - FAILOVER_SHARE * group.config.call_timeout
        if cut - time.monotonic() < FAIR_SHARE * group.config.call_timeout:
            return at  # a call that spent its time elsewhere: its member gets the rest
        return cut

    def member_timed_out(self, group: Group) -> None:
        """A member outlived its part of the call and is failed: the call's other
        members get the rest, up to the call's own deadline."""
        self._failed_over = True

    def carried(self, carried: tuple[float, float], group: Group) -> None:
        """The call may be the continuation of one that began at `carried[0]` (a direct
        call that outlived its member's part of call_timeout, reported at `carried[1]`, whose member was found
        hung): if it came at once (the client sends it right after its report), the same
        deadline, its first member timed out."""
        arrival, reported = carried
        if self.arrival - reported > CARRY_WINDOW:
            return
        if arrival < self.arrival:
            self.arrival = arrival
            self._at = self._limit = None
        self.member_timed_out(group)


_current: contextvars.ContextVar[CallBudget | None] = contextvars.ContextVar(
    "p11p_call_budget", default=None)


def begin() -> contextvars.Token[CallBudget | None]:
    """An application call arrives: its budget starts now."""
    return _current.set(CallBudget())


def end(token: contextvars.Token[CallBudget | None]) -> None:
    _current.reset(token)


def outside() -> None:
    """The running task is not an application call (a background one started from a
    call inherits its context): its waits get fresh budgets."""
    _current.set(None)


def current() -> CallBudget:
    """The running application call's budget, or (outside one) a fresh one."""
    budget = _current.get()
    return budget if budget is not None else CallBudget()


def remaining(group: Group) -> float:
    return current().remaining(group)


def member_limit(group: Group) -> float:
    """Seconds a member may take on one call before it counts as hung (the direct
    path's clients time their calls with it)."""
    cfg = group.config
    if len(group.members) < 2:
        return float(cfg.call_timeout)
    return float(cfg.call_timeout * (1 - FAILOVER_SHARE))


def fair(given: float, group: Group) -> bool:
    """Whether a member wait that was given `given` seconds and outlived them is the
    member's failure."""
    return given >= FAIR_SHARE * group.config.call_timeout
