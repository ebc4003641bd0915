"""Sessions of the virtual token (fake member link): a session is opened on a member at
its first call that needs one; what a module answers at C_OpenSession and C_Login for
the sessions it has, and the session counts of C_GetTokenInfo, are p11p's then."""

from __future__ import annotations

import asyncio

import pytest
from fakelink import OK, USER_PIN, FakeDaemon
from p11p.protocol.constants import CKF, CKR, CKU

RW_SERIAL = CKF["CKF_RW_SESSION"] | CKF["CKF_SERIAL_SESSION"]
RO_SERIAL = CKF["CKF_SERIAL_SESSION"]


@pytest.mark.parametrize("policy", ["failover", "balance"])
def test_a_session_is_opened_on_a_member_at_its_first_call(policy: str) -> None:
    async def go() -> None:
        d = FakeDaemon(["m1", "m2"], policy)
        ctx = d.context(1)
        s = (await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0))[1]
        t = (await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0))[1]
        assert (await d.call(ctx, "C_CloseSession", t)) == [OK]
        assert all("C_OpenSession" not in tok.calls for tok in d.tokens.values())
        assert (await d.call(ctx, "C_GenerateRandom", s, 8))[0] == OK
        opened = [n for n, tok in d.tokens.items() if "C_OpenSession" in tok.calls]
        assert len(opened) == 1, opened
        await ctx.close()
    asyncio.run(go())


def test_token_info_counts_the_application_s_sessions() -> None:
    """The members' modules see only the sessions placed on them (and p11p's own)."""
    async def go() -> None:
        d = FakeDaemon(["m1", "m2"], "balance")
        ctx = d.context(1)
        hs = [(await d.call(ctx, "C_OpenSession", 7, flags, 0))[1]
              for flags in (RW_SERIAL, RW_SERIAL, RO_SERIAL)]
        assert (await d.call(ctx, "C_GenerateRandom", hs[0], 8))[0] == OK
        info = await d.call(ctx, "C_GetTokenInfo", 7, 0)
        assert info[0] == OK and (info[1][6], info[1][8]) == (3, 2), info
        assert (await d.call(ctx, "C_CloseSession", hs[2])) == [OK]
        info = await d.call(ctx, "C_GetTokenInfo", 7, 0)
        assert (info[1][6], info[1][8]) == (2, 2), info
        await ctx.close()
    asyncio.run(go())


def test_so_login_and_read_only_sessions_exclude_each_other() -> None:
    async def go() -> None:
        d = FakeDaemon(["m1", "m2"], "failover")
        ctx = d.context(1)
        rw = (await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0))[1]
        ro = (await d.call(ctx, "C_OpenSession", 7, RO_SERIAL, 0))[1]
        reply = await d.call(ctx, "C_Login", rw, CKU["CKU_SO"], USER_PIN)
        assert reply == [CKR["CKR_SESSION_READ_ONLY_EXISTS"]]
        assert "C_Login" not in d.tokens["m1"].calls + d.tokens["m2"].calls
        assert (await d.call(ctx, "C_CloseSession", ro)) == [OK]
        assert (await d.call(ctx, "C_Login", rw, CKU["CKU_SO"], USER_PIN)) == [OK]
        reply = await d.call(ctx, "C_OpenSession", 7, RO_SERIAL, 0)
        assert reply == [CKR["CKR_SESSION_READ_WRITE_SO_EXISTS"], None]
        assert (await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0))[0] == OK
        await ctx.close()
    asyncio.run(go())


def test_a_write_protected_token_refuses_read_write_sessions() -> None:
    async def go() -> None:
        d = FakeDaemon(["m1", "m2"], "failover")
        for m in d.group.members:
            m.token_flags |= CKF["CKF_WRITE_PROTECTED"]
        ctx = d.context(1)
        reply = await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0)
        assert reply == [CKR["CKR_TOKEN_WRITE_PROTECTED"], None]
        assert (await d.call(ctx, "C_OpenSession", 7, RO_SERIAL, 0))[0] == OK
        d.group.members[0].token_flags = 0  # one member that takes writes: it may serve
        assert (await d.call(ctx, "C_OpenSession", 7, RW_SERIAL, 0))[0] == OK
        await ctx.close()
    asyncio.run(go())
