"""Shared fixtures: SoftHSM2 tokens, a p11p daemon over them, applications loaded on
the client library. Session-scoped where starting them again would only cost time."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kit import CLIENT_SO, SOFTHSM_SO, Daemon, SoftHSM, Target, one_member_group


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSM:
    hsm = SoftHSM(tmp_path_factory.mktemp("softhsm"))
    hsm.init_token("tokA")
    hsm.init_token("tokB")
    hsm.apply_env()  # for applications that load SoftHSM2 directly in this process
    return hsm


@pytest.fixture(scope="session")
def daemon(softhsm: SoftHSM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("p11p"), {
        "signing": one_member_group("signing", softhsm, "tokA"),
    })
    d.start()
    os.environ["P11P_SOCKET"] = str(d.socket)
    yield d
    d.stop()


@pytest.fixture(scope="session")
def pykcs11_p11p(daemon: Daemon):  # type: ignore[no-untyped-def]
    import PyKCS11
    lib = PyKCS11.PyKCS11Lib()
    lib.load(str(CLIENT_SO))
    return lib


@pytest.fixture(scope="session")
def pykcs11_direct(softhsm: SoftHSM):  # type: ignore[no-untyped-def]
    import PyKCS11
    lib = PyKCS11.PyKCS11Lib()
    lib.load(str(SOFTHSM_SO))
    return lib


def _slot_with_label(lib, label: str) -> int:  # type: ignore[no-untyped-def]
    for slot in lib.getSlotList(tokenPresent=True):
        if lib.getTokenInfo(slot).label.strip() == label:
            return int(slot)
    raise LookupError(label)


@pytest.fixture(params=["direct", "p11p"])
def target(request: pytest.FixtureRequest) -> Target:
    """The same battery runs against SoftHSM2 directly and through p11p."""
    if request.param == "direct":
        lib = request.getfixturevalue("pykcs11_direct")
        return Target("direct", lib, _slot_with_label(lib, "tokA"), SOFTHSM_SO)
    lib = request.getfixturevalue("pykcs11_p11p")
    return Target("p11p", lib, _slot_with_label(lib, "signing"), CLIENT_SO)
