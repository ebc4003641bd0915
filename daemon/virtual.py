"""The virtual view of one application: its sessions and objects, and what stands behind.

A VirtualSession is what the application's session handle means: a group, the member
serving it now, the member's session handle, and what is needed to rebuild it on
another member (open flags; the operation and find state are tracked by the HA layer).
A VirtualObject is what an object handle means: the object's identity across members
(class, CKA_ID, CKA_LABEL, key type), whether it is a token or a session object, and
its handle on each member where it has been resolved.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p11p.protocol.constants import CKA

if TYPE_CHECKING:
    from p11p.daemon.context import ApplicationContext
    from p11p.daemon.helperproc import HelperProcess
    from p11p.daemon.members import Group, Member

_ULONG = struct.Struct("=Q")
CKA_TOKEN = CKA["CKA_TOKEN"]
CKA_CLASS = CKA["CKA_CLASS"]
CKA_ID = CKA["CKA_ID"]
CKA_LABEL = CKA["CKA_LABEL"]
CKA_KEY_TYPE = CKA["CKA_KEY_TYPE"]
# The attributes read once per newly seen object; caps cover usual ids and labels.
IDENTITY_TEMPLATE = [[CKA_TOKEN, 1], [CKA_CLASS, 8], [CKA_ID, 256], [CKA_LABEL, 256],
                     [CKA_KEY_TYPE, 8]]


@dataclass(frozen=True, slots=True)
class ObjectIdentity:
    """What makes 'the same object' on two members."""

    object_class: int | None
    object_id: bytes | None
    label: bytes | None
    key_type: int | None


def identity_from_values(values: list[Any]) -> tuple[bool | None, ObjectIdentity]:
    """Reads (token flag, identity) from a reply to IDENTITY_TEMPLATE."""
    def ulong(v: Any) -> int | None:
        return _ULONG.unpack(v)[0] if isinstance(v, bytes) and len(v) == 8 else None

    def raw(v: Any) -> bytes | None:
        return v if isinstance(v, bytes) else None

    token = values[0]
    is_token = bool(token[0]) if isinstance(token, bytes) and len(token) == 1 else None
    return is_token, ObjectIdentity(ulong(values[1]), raw(values[2]), raw(values[3]),
                                    ulong(values[4]))


@dataclass(eq=False)
class VirtualObject:
    handle: int = 0
    is_token: bool | None = None
    identity: ObjectIdentity | None = None
    real: dict[Member, int] = field(default_factory=dict)
    owner: VirtualSession | None = None  # the session that made a session object


@dataclass(eq=False)
class VirtualSession:
    handle: int
    context: ApplicationContext
    group: Group
    flags: int
    member: Member
    helper: HelperProcess
    real: int
    objects: set[VirtualObject] = field(default_factory=set)
    busy: int = 0

    def real_object(self, vobj: VirtualObject) -> int | None:
        return vobj.real.get(self.member)
