"""Exceptions that carry a CK_RV across the daemon, and the classification of CK_RVs.

Inside the daemon failures are exceptions; at the client boundary they become one
CK_RV. The class table (application result / session lost / member failed) is the one
place that says what a member's return code means for the HA policy.
"""

from __future__ import annotations

from enum import Enum

from p11p.protocol import spec
from p11p.protocol.constants import CKR, rv_name


class CKError(Exception):
    """A call ends with this CK_RV for the application."""

    def __init__(self, rv: int, why: str = "") -> None:
        super().__init__(f"{rv_name(rv)}{': ' + why if why else ''}")
        self.rv = rv


class MemberUnavailable(Exception):
    """A member cannot serve a call: its helper died, hung, or the module failed."""

    def __init__(self, member: str, why: str, rv: int = CKR["CKR_DEVICE_ERROR"],
                 function: str = "") -> None:
        super().__init__(f"member {member}: {why}")
        self.member = member
        self.rv = rv
        self.function = function  # the member call that failed, when known


# C_Login answers that say a member's token cannot log anybody in (its store lost the
# user PIN, say): for a PIN another member takes, the member fails (bind, failures)
TOKEN_UNFIT = frozenset({CKR["CKR_USER_PIN_NOT_INITIALIZED"], CKR["CKR_TOKEN_NOT_RECOGNIZED"]})


class RvClass(Enum):
    APPLICATION = "application"
    SESSION_LOST = "session_lost"
    MEMBER_FAILED = "member_failed"


DEFAULT_CLASSES: dict[int, RvClass] = {
    CKR["CKR_SESSION_HANDLE_INVALID"]: RvClass.SESSION_LOST,
    CKR["CKR_SESSION_CLOSED"]: RvClass.SESSION_LOST,
    CKR["CKR_DEVICE_ERROR"]: RvClass.MEMBER_FAILED,
    CKR["CKR_TOKEN_NOT_PRESENT"]: RvClass.MEMBER_FAILED,
    CKR["CKR_GENERAL_ERROR"]: RvClass.MEMBER_FAILED,
    CKR["CKR_DEVICE_REMOVED"]: RvClass.MEMBER_FAILED,
    CKR["CKR_DEVICE_MEMORY"]: RvClass.MEMBER_FAILED,
}
# A member's answer that a handle it was given is unknown, in any of the roles the
# function description gives object handles (the key of C_DigestKey, a wrapping key...):
# for a handle the daemon translated, the member handle is stale (its sessions closed
# behind p11p's back, say), or the object was deleted there.
STALE_OBJECT = frozenset(CKR[rv] for rv in spec.HANDLE_ROLES.values())
# Codes that are session-lost only when the daemon's view says the state should exist
# (the session is logged in / the object is known): see policy.classify().
CONDITIONAL_SESSION_LOST = frozenset({CKR["CKR_USER_NOT_LOGGED_IN"], *STALE_OBJECT})


def class_table(overrides: dict[int, str]) -> dict[int, RvClass]:
    """The default table with a group's `rv_class` overrides applied."""
    table = dict(DEFAULT_CLASSES)
    for rv, name in overrides.items():
        table[rv] = RvClass(name)
    return table
