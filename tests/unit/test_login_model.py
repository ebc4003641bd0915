"""DESIGN invariant 1, generated: an application logged in on the virtual token is logged
in on every member session that serves it, whatever opens, closes, logs in or out,
drains, enables or fails underneath. Hypothesis drives the real Router and Dispatcher
over fake members (fakelink.py) that apply PKCS#11's login rules; each step checks the
invariant and that a logged-in application's find sees the private object."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fakelink import CODE, OK, USER_PIN, FakeDaemon
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from p11p.daemon.errors import MemberUnavailable
from p11p.daemon.members import MemberState
from p11p.protocol.constants import CKR

CKU_USER = 1
RW_SERIAL = 6
LOGGED_IN_STATES = (1, 3)  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """The machine fails members hundreds of times: their log lines are not the test."""
    logger = logging.getLogger("p11p")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


class LoginMachine(RuleBasedStateMachine):
    """Two applications, up to six sessions each, on a group of three fake members."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()

    @rule()
    def settle(self) -> None:
        """The daemon's background work (standby logins) runs to its end."""
        async def idle() -> None:
            for _ in range(50):
                await asyncio.sleep(0)
        self.run(idle())
        # a logged-in application is logged in on every member in service (standby.py)
        for app, ctx in enumerate(self.apps):
            for m in self.d.group.members:
                if self.logged[app] and m.health.state is MemberState.OK:
                    assert m in ctx.logged_in, (app, m.name, "not logged in in standby")
                    assert self.d.helpers[(app + 1, m.name)].logged_in, (app, m.name)

    def back(self, member: Any) -> None:
        async def back() -> None:
            self.d.standby.member_back(member)
        self.run(back())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @initialize(policy=st.sampled_from(["failover", "balance"]))
    def start(self, policy: str) -> None:
        async def make() -> None:
            self.d = FakeDaemon(["m1", "m2", "m3"], policy)
            self.apps = [self.d.context(1), self.d.context(2)]
        self.run(make())
        self.sessions: list[list[int]] = [[], []]
        self.logged: list[bool] = [False, False]

    def teardown(self) -> None:
        self.loop.close()

    def call(self, app: int, name: str, *args: Any) -> list[Any]:
        reply: list[Any] = self.run(self.d.call(self.apps[app], name, *args))
        return reply

    @rule(busy=st.lists(st.integers(0, 3), min_size=3, max_size=3))
    def load(self, busy: list[int]) -> None:
        """Other applications' calls in flight on each member: steers balance."""
        for m, load in zip(self.d.group.members, busy, strict=True):
            m.health.calls_in_flight = load

    @rule(app=st.integers(0, 1))
    def open_session(self, app: int) -> None:
        if len(self.sessions[app]) >= 6:
            return
        reply = self.call(app, "C_OpenSession", 7, RW_SERIAL, 0)
        assert reply[0] == OK, reply
        self.sessions[app].append(reply[1])

    @precondition(lambda self: any(self.sessions))
    @rule(app=st.integers(0, 1), which=st.integers(0, 5))
    def close_session(self, app: int, which: int) -> None:
        if not self.sessions[app]:
            return
        h = self.sessions[app].pop(which % len(self.sessions[app]))
        assert self.call(app, "C_CloseSession", h) == [OK]
        if not self.sessions[app]:
            self.logged[app] = False  # §5.6: the last session closed

    @rule(app=st.integers(0, 1))
    def login(self, app: int) -> None:
        if not self.sessions[app]:
            return
        reply = self.call(app, "C_Login", self.sessions[app][0], CKU_USER, USER_PIN)
        want = CKR["CKR_USER_ALREADY_LOGGED_IN"] if self.logged[app] else OK
        assert reply[0] == want, reply
        self.logged[app] = True

    @rule(app=st.integers(0, 1))
    def logout(self, app: int) -> None:
        if not self.sessions[app]:
            return
        reply = self.call(app, "C_Logout", self.sessions[app][-1])
        want = OK if self.logged[app] else CKR["CKR_USER_NOT_LOGGED_IN"]
        assert reply[0] == want, reply
        self.logged[app] = False

    @rule(app=st.integers(0, 1), which=st.integers(0, 5))
    def find_private(self, app: int, which: int) -> None:
        if not self.sessions[app]:
            return
        h = self.sessions[app][which % len(self.sessions[app])]
        assert self.call(app, "C_FindObjectsInit", h, [])[0] == OK
        reply = self.call(app, "C_FindObjects", h, 10)
        assert self.call(app, "C_FindObjectsFinal", h) == [OK]
        assert reply[0] == OK and len(reply[1]) == (2 if self.logged[app] else 1), \
            (reply, self.logged[app])

    @rule(app=st.integers(0, 1), which=st.integers(0, 5))
    def session_info(self, app: int, which: int) -> None:
        if not self.sessions[app]:
            return
        reply = self.call(app, "C_GetSessionInfo", self.sessions[app][which % len(self.sessions[app])], 0)
        assert reply[0] == OK
        assert (reply[1][1] in LOGGED_IN_STATES) == self.logged[app], (reply, self.logged[app])

    @rule(member=st.integers(0, 2))
    def drain(self, member: int) -> None:
        m = self.d.group.members[member]
        if m.health.state is not MemberState.OK or sum(
                x.health.state is MemberState.OK for x in self.d.group.members) < 2:
            return
        m.mark(MemberState.DRAINING)
        for ctx in self.apps:
            for vs in ctx.sessions.values():
                if m in vs.real and (vs.member is not m or vs.movable):
                    self.run(self.d.router.bind.leave(ctx, vs, m))
            self.run(self.d.router.bind.close_utility(ctx, m))

    @rule(member=st.integers(0, 2))
    def fail(self, member: int) -> None:
        """The member's helpers die; recovery brings it back at once (new instances)."""
        m = self.d.group.members[member]
        if m.health.state is not MemberState.OK or sum(
                x.health.state is MemberState.OK for x in self.d.group.members) < 2:
            return
        self.d.router.failures.member_failed(m, MemberUnavailable(m.name, "test"), "test")
        for pid, ctx in ((1, self.apps[0]), (2, self.apps[1])):
            helper = self.d.helpers[(pid, m.name)] = type(self.d.helpers[(pid, m.name)])(
                self.d.tokens[m.name])
            fut = self.loop.create_future()
            fut.set_result(helper)
            ctx._helpers[m] = fut
        m.mark(MemberState.OK)
        self.back(m)  # as recovery.put_back: logged-in applications log in there

    @rule(member=st.integers(0, 2))
    def enable(self, member: int) -> None:
        m = self.d.group.members[member]
        if m.health.state is MemberState.DRAINING:
            m.mark(MemberState.OK)
            self.back(m)  # as service.enable

    @invariant()
    def logged_in_on_every_member_session(self) -> None:
        """Invariant 1: the member session serving each session of a logged-in
        application is logged in (the login is per application and member), and the
        daemon's belief of where it is logged in is true. Its converse: no member is
        logged in for an application that is not (it logged out, or all its sessions
        closed). An idle member session a session left behind logs in when it serves
        again."""
        if not hasattr(self, "d"):
            return
        for pid, ctx in ((1, self.apps[0]), (2, self.apps[1])):
            logged = self.logged[pid - 1]
            for member in self.d.group.members:
                helper = self.d.helpers[(pid, member.name)]
                serving = any(vs.member is member and member in vs.real
                              for vs in ctx.sessions.values())
                if serving and logged:
                    assert helper.logged_in, (member.name, "serving, not logged in")
                if member in ctx.logged_in:
                    assert helper.logged_in, (member.name, "believed logged in, is not")
                if not logged:
                    assert not helper.logged_in, (member.name, "logged in after logout")


LoginMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, derandomize=True,
    database=None, suppress_health_check=[HealthCheck.too_slow])
test_login_model = LoginMachine.TestCase


def test_the_fake_link_knows_the_calls_the_machine_uses() -> None:
    assert {"C_OpenSession", "C_Login", "C_FindObjectsInit"} <= set(CODE)


@pytest.mark.parametrize("policy", ["failover", "balance"])
def test_closing_the_last_session_on_a_member_drops_the_login_there(policy: str) -> None:
    """The shortest lifecycle the balance defect needed: logged in on m1, a session on
    m2 opens and closes (the module logs the application out of m2), the next session
    on m2 must log in again."""
    async def go() -> None:
        d = FakeDaemon(["m1", "m2"], policy)
        ctx = d.context(1)
        s0 = (await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0))[1]
        assert (await d.call(ctx, "C_Login", s0, CKU_USER, USER_PIN))[0] == OK
        m1, m2 = d.group.members
        m1.health.calls_in_flight = 5  # m1 busy: balance puts the next ones on m2
        for _ in range(2):
            s = (await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0))[1]
            info = await d.call(ctx, "C_GetSessionInfo", s, 0)
            assert info[1][1] in LOGGED_IN_STATES
            assert (await d.call(ctx, "C_CloseSession", s))[0] == OK
        m1.health.calls_in_flight = 0
        await ctx.close()
    asyncio.run(go())


@pytest.mark.parametrize("standby", [True, False])
def test_a_login_reaches_the_standby_member_unless_turned_off(standby: bool) -> None:
    """standby.py: logged in on m1, the application is logged in on m2 too, where it has
    no session, in the background; with `standby_logins = false`, only where it has one.
    Either way a session that moves to m2 is logged in there."""
    async def go() -> None:
        d = FakeDaemon(["m1", "m2"], "failover")
        d.group.config = dataclasses.replace(d.group.config, standby_logins=standby)
        ctx = d.context(1)
        m1, m2 = d.group.members
        s0 = (await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0))[1]
        assert (await d.call(ctx, "C_Login", s0, CKU_USER, USER_PIN))[0] == OK
        for _ in range(50):
            await asyncio.sleep(0)
        assert (m2 in ctx.logged_in) is standby
        assert d.helpers[(1, "m2")].logged_in is standby if (1, "m2") in d.helpers else not standby
        d.router.failures.member_failed(m1, MemberUnavailable("m1", "test"), "test")
        info = await d.call(ctx, "C_GetSessionInfo", s0, 0)
        assert info[0] == OK and info[1][1] in LOGGED_IN_STATES
        assert m2 in ctx.logged_in
        await ctx.close()
    asyncio.run(go())
