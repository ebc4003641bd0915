"""HA policy as pure functions: which member serves a call, what a CK_RV means, and how
a call changes a session's replayable state. No I/O here, so all of it is tested fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from p11p.daemon.errors import CONDITIONAL_SESSION_LOST, STALE_OBJECT, RvClass
from p11p.protocol import spec
from p11p.protocol.constants import CKR

if TYPE_CHECKING:
    from p11p.daemon.virtual import VirtualObject

OK = CKR["CKR_OK"]
BUFFER_TOO_SMALL = CKR["CKR_BUFFER_TOO_SMALL"]


class Candidate(Protocol):
    """What the policy needs to know of a member."""

    @property
    def placeable(self) -> bool: ...  # healthy and not draining: may take new work
    @property
    def usable(self) -> bool: ...  # may go on serving work it has
    @property
    def load(self) -> float: ...  # outstanding calls / weight


def choose_member(members: Sequence[Candidate], policy: str, current: Candidate | None,
                  movable: bool, allowed: Sequence[Candidate] | None = None) -> Candidate | None:
    """The member for a session's next call.

    A session that cannot move (an operation, a find or session objects in progress)
    stays on its member while that member is usable. Otherwise: `failover` takes the
    first placeable member in priority order, `balance` the least loaded one (ties in
    priority order). `allowed` narrows the choice to members holding the keys involved.
    """
    pool = [m for m in members if allowed is None or m in allowed]
    if current is not None and current in pool and current.usable and not movable:
        return current
    placeable = [m for m in pool if m.placeable]
    if not placeable:
        return current if current is not None and current in pool and current.usable else None
    if policy == "balance":
        return min(placeable, key=lambda m: m.load)  # min() keeps the first of equals
    return placeable[0]


def classify(rv: int, table: dict[int, RvClass], logged_in: bool, object_known: bool) -> RvClass:
    """The class of a member's CK_RV, given what the daemon's view says."""
    cls = table.get(rv)
    if cls is not None:
        return cls
    if rv in CONDITIONAL_SESSION_LOST:
        if rv == CKR["CKR_USER_NOT_LOGGED_IN"] and logged_in:
            return RvClass.SESSION_LOST
        if rv in STALE_OBJECT and object_known:
            return RvClass.SESSION_LOST
    return RvClass.APPLICATION


# -- operations --------------------------------------------------------------------

# From functions.spec's @op and @opaque flags (finds are kept apart, in FindState).
_OPS = [f for f in spec.functions() if f.op_kind and f.op_kind != "find" and not f.opaque]
INIT = {f.name: f.op_kind for f in _OPS if f.op_role == "init"}
UPDATE = {f.name: f.op_kind for f in _OPS if f.op_role == "update"}
# Calls that end their operation unless they were a length query or got BUFFER_TOO_SMALL.
FINISH = {f.name: f.op_kind for f in _OPS if f.op_role in ("final", "oneshot")}
# Calls whose effect p11p does not record: they make the active operations unreplayable.
OPAQUE = frozenset(f.name for f in spec.functions() if f.opaque)


def operation_kind(name: str) -> str | None:
    """The kind of operation (encrypt, sign, ...) a call starts, continues or ends."""
    return INIT.get(name) or UPDATE.get(name) or FINISH.get(name)


@dataclass
class Operation:
    """An active operation, as the application started it (virtual handles)."""

    init: list[Any]  # the Init request: [code, session, mechanism, key]
    updates: list[tuple[list[Any], bytes | None]] = field(default_factory=list)
    # the objects the init names, by virtual handle: a session key the application
    # destroys meanwhile is made again from its recipe for a replay, and goes after it
    keys: dict[int, VirtualObject] = field(default_factory=dict)
    size: int = 0
    replayable: bool = True
    why: str = ""


@dataclass
class OpChange:
    """What a completed call did to a session's operations."""

    start: str | None = None
    update: str | None = None
    end: str | None = None
    opaque: bool = False


def operation_change(name: str, rv: int, output_requested: bool) -> OpChange:
    """How `name` returning `rv` changes the session's operations (PKCS#11 §5.2: a
    length query or CKR_BUFFER_TOO_SMALL leaves the operation active; any other
    outcome of a finishing call ends it; an error from an update ends it)."""
    if name in INIT:
        return OpChange(start=INIT[name]) if rv == OK else OpChange()
    if name in UPDATE:
        if rv == OK:
            return OpChange(update=UPDATE[name])
        if rv == BUFFER_TOO_SMALL:
            return OpChange()
        return OpChange(end=UPDATE[name])
    if name in FINISH:
        if rv == BUFFER_TOO_SMALL or (rv == OK and not output_requested):
            return OpChange()
        return OpChange(end=FINISH[name])
    if name in OPAQUE:
        # refused, it changed no state p11p cannot record, and what it changed the member
        # says: a refused C_DigestKey (an unknown or indigestible key) leaves the digest
        # running in SoftHSM2, so it stays in p11p's view too (ended there, a session
        # moved at the next call would answer its final CKR_OPERATION_NOT_INITIALIZED)
        return OpChange(opaque=True) if rv == OK else OpChange()
    return OpChange()
