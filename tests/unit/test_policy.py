"""The HA policy as pure functions: member choice, CK_RV classes, operation tracking."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from p11p.daemon.errors import DEFAULT_CLASSES, RvClass, class_table
from p11p.daemon.policy import OpChange, choose_member, classify, operation_change
from p11p.protocol.constants import CKR


@dataclass(eq=False)
class M:
    name: str
    placeable: bool = True
    usable: bool = True
    load: float = 0.0


def test_failover_takes_the_first_healthy_member() -> None:
    a, b, c = M("a"), M("b"), M("c")
    assert choose_member([a, b, c], "failover", None, True) is a
    a.placeable = a.usable = False
    assert choose_member([a, b, c], "failover", None, True) is b


def test_balance_takes_the_least_loaded_and_breaks_ties_by_priority() -> None:
    a, b = M("a", load=2), M("b", load=1)
    assert choose_member([a, b], "balance", None, True) is b
    b.load = 2
    assert choose_member([a, b], "balance", None, True) is a


def test_a_busy_session_stays_while_its_member_is_usable() -> None:
    a, b = M("a", load=9), M("b")
    assert choose_member([a, b], "balance", a, movable=False) is a
    a.placeable = False  # draining: keeps its busy sessions
    assert choose_member([a, b], "balance", a, movable=False) is a
    assert choose_member([a, b], "balance", a, movable=True) is b
    a.usable = False  # failed: even a busy session must go
    assert choose_member([a, b], "balance", a, movable=False) is b


def test_failback_at_an_operation_boundary() -> None:
    a, b = M("a"), M("b")
    assert choose_member([a, b], "failover", b, movable=True) is a
    assert choose_member([a, b], "failover", b, movable=False) is b


def test_keys_narrow_the_choice_and_nothing_usable_gives_none() -> None:
    a, b = M("a"), M("b")
    assert choose_member([a, b], "failover", None, True, allowed=[b]) is b
    b.placeable = b.usable = False
    assert choose_member([a, b], "failover", None, True, allowed=[b]) is None


@pytest.mark.parametrize("name, cls", [
    ("CKR_OK", RvClass.APPLICATION), ("CKR_PIN_INCORRECT", RvClass.APPLICATION),
    ("CKR_SIGNATURE_INVALID", RvClass.APPLICATION), ("CKR_BUFFER_TOO_SMALL", RvClass.APPLICATION),
    ("CKR_SESSION_HANDLE_INVALID", RvClass.SESSION_LOST), ("CKR_SESSION_CLOSED", RvClass.SESSION_LOST),
    ("CKR_DEVICE_ERROR", RvClass.MEMBER_FAILED), ("CKR_TOKEN_NOT_PRESENT", RvClass.MEMBER_FAILED),
    ("CKR_GENERAL_ERROR", RvClass.MEMBER_FAILED), ("CKR_DEVICE_REMOVED", RvClass.MEMBER_FAILED),
    ("CKR_DEVICE_MEMORY", RvClass.MEMBER_FAILED),
])
def test_default_classes(name: str, cls: RvClass) -> None:
    assert classify(CKR[name], DEFAULT_CLASSES, False, False) is cls


def test_conditional_session_lost_follows_the_view() -> None:
    nli, ohi = CKR["CKR_USER_NOT_LOGGED_IN"], CKR["CKR_OBJECT_HANDLE_INVALID"]
    assert classify(nli, DEFAULT_CLASSES, logged_in=False, object_known=True) is RvClass.APPLICATION
    assert classify(nli, DEFAULT_CLASSES, logged_in=True, object_known=False) is RvClass.SESSION_LOST
    assert classify(ohi, DEFAULT_CLASSES, logged_in=True, object_known=False) is RvClass.APPLICATION
    assert classify(ohi, DEFAULT_CLASSES, logged_in=False, object_known=True) is RvClass.SESSION_LOST


@pytest.mark.parametrize("name", ["CKR_KEY_HANDLE_INVALID", "CKR_WRAPPING_KEY_HANDLE_INVALID",
                                  "CKR_UNWRAPPING_KEY_HANDLE_INVALID"])
def test_every_handle_role_s_code_is_a_stale_handle_for_a_known_object(name: str) -> None:
    """A member's answer for a key handle the daemon translated (C_DigestKey's key, a
    wrapping key) is a stale member handle, as CKR_OBJECT_HANDLE_INVALID is."""
    assert classify(CKR[name], DEFAULT_CLASSES, logged_in=False, object_known=True) \
        is RvClass.SESSION_LOST
    assert classify(CKR[name], DEFAULT_CLASSES, logged_in=True, object_known=False) \
        is RvClass.APPLICATION


def test_group_overrides() -> None:
    table = class_table({CKR["CKR_FUNCTION_FAILED"]: "member_failed",
                         CKR["CKR_DEVICE_ERROR"]: "application"})
    assert classify(CKR["CKR_FUNCTION_FAILED"], table, False, False) is RvClass.MEMBER_FAILED
    assert classify(CKR["CKR_DEVICE_ERROR"], table, False, False) is RvClass.APPLICATION


def test_operation_life_cycle() -> None:
    ok, small = CKR["CKR_OK"], CKR["CKR_BUFFER_TOO_SMALL"]
    assert operation_change("C_SignInit", ok, True).start == "sign"
    assert operation_change("C_SignInit", CKR["CKR_KEY_HANDLE_INVALID"], True).start is None
    assert operation_change("C_SignUpdate", ok, True).update == "sign"
    assert operation_change("C_SignUpdate", CKR["CKR_DATA_LEN_RANGE"], True).end == "sign"
    assert operation_change("C_Sign", ok, output_requested=False).end is None  # length query
    assert operation_change("C_Sign", small, True).end is None
    assert operation_change("C_Sign", ok, True).end == "sign"
    assert operation_change("C_Verify", CKR["CKR_SIGNATURE_INVALID"], True).end == "verify"
    assert operation_change("C_EncryptUpdate", small, True).update is None
    assert operation_change("C_DigestKey", ok, True).opaque
    # refused (an unknown or indigestible key), the digest goes on, as in SoftHSM2
    assert operation_change("C_DigestKey", CKR["CKR_KEY_INDIGESTIBLE"], True) == OpChange()
    assert operation_change("C_GenerateRandom", ok, True) == operation_change("C_Logout", ok, True)
