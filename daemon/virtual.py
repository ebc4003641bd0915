"""The virtual view of one application: its sessions and objects, and what stands behind.

A VirtualSession is what the application's session handle means: a group, the member
serving it now, its member session on each member it has used, and what is needed to
rebuild it elsewhere (open flags, active operations with their update data, an open
find and what it returned; the context keeps the login). A VirtualObject is what an
object handle means: the object's identity across members (class, CKA_ID, CKA_LABEL,
key type), whether it is a token or a session object, its handle on each member where
it has been resolved, and for a session object the recipe that made it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from p11p.daemon.policy import Operation
from p11p.protocol.constants import CKA

if TYPE_CHECKING:
    from p11p.daemon.context import ApplicationContext
    from p11p.daemon.direct import Binding
    from p11p.daemon.members import Group, Member

_ULONG = struct.Struct("=Q")
CKA_TOKEN = CKA["CKA_TOKEN"]
CKA_CLASS = CKA["CKA_CLASS"]
CKA_ID = CKA["CKA_ID"]
CKA_LABEL = CKA["CKA_LABEL"]
CKA_KEY_TYPE = CKA["CKA_KEY_TYPE"]
CKA_APPLICATION = CKA["CKA_APPLICATION"]
CKA_PRIVATE = CKA["CKA_PRIVATE"]
# The attributes read once per newly seen object; caps cover usual ids and labels.
# CKA_APPLICATION tells data objects apart (they have no CKA_ID or key type).
IDENTITY_TEMPLATE = [[CKA_TOKEN, 1], [CKA_CLASS, 8], [CKA_ID, 256], [CKA_LABEL, 256],
                     [CKA_KEY_TYPE, 8], [CKA_APPLICATION, 256], [CKA_PRIVATE, 1]]


def ulong_value(value: int) -> bytes:
    return _ULONG.pack(value)


@dataclass(frozen=True, slots=True)
class ObjectIdentity:
    """What makes 'the same object' on two members. Objects alike in all of these
    cannot be told apart across members (documented limit)."""

    object_class: int | None
    object_id: bytes | None
    label: bytes | None
    key_type: int | None
    application: bytes | None = None

    def template(self) -> list[list[Any]]:
        """A find template that selects this object (token objects only)."""
        t: list[list[Any]] = [[CKA_TOKEN, b"\x01"]]
        if self.object_class is not None:
            t.append([CKA_CLASS, ulong_value(self.object_class)])
        if self.object_id is not None:
            t.append([CKA_ID, self.object_id])
        if self.label is not None:
            t.append([CKA_LABEL, self.label])
        if self.key_type is not None:
            t.append([CKA_KEY_TYPE, ulong_value(self.key_type)])
        if self.application is not None:
            t.append([CKA_APPLICATION, self.application])
        return t


def _flag(v: Any) -> bool | None:
    return bool(v[0]) if isinstance(v, bytes) and len(v) == 1 else None


def private_from_values(values: list[Any]) -> bool | None:
    """CKA_PRIVATE from a reply to IDENTITY_TEMPLATE (not part of the identity)."""
    return _flag(values[6]) if len(values) > 6 else None


def identity_from_values(values: list[Any]) -> tuple[bool | None, ObjectIdentity]:
    """Reads (token flag, identity) from a reply to IDENTITY_TEMPLATE."""
    def ulong(v: Any) -> int | None:
        return int(_ULONG.unpack(v)[0]) if isinstance(v, bytes) and len(v) == 8 else None

    def raw(v: Any) -> bytes | None:
        return v if isinstance(v, bytes) else None

    is_token = _flag(values[0])
    return is_token, ObjectIdentity(ulong(values[1]), raw(values[2]), raw(values[3]),
                                    ulong(values[4]), raw(values[5]))


@dataclass(eq=False)
class Recipe:
    """The call that made session objects, to make them again on another member.

    `sources` are the objects the call named (key, base key, unwrapping key, object to
    copy), kept even after the application destroys them: a copy whose source is gone
    is remade by remaking the source for the moment. `roots` are the random recipes
    (C_GenerateKey/Pair) this one depends on, itself included when it is one: once an
    object made from one of them has been used, remaking it would give other bits, so
    none of them is remade any more."""

    request: list[Any]  # virtual form
    outputs: list[VirtualObject | None]  # per output of the call, the object it made
    generated: bool  # a key generated at random
    sources: dict[int, VirtualObject] = field(default_factory=dict)  # virtual handle ->
    roots: list[Recipe] = field(default_factory=list)
    used: bool = False  # (a random recipe) an object depending on it was used

    def __post_init__(self) -> None:
        roots = [self] if self.generated else []
        for src in self.sources.values():
            if src.recipe is not None:
                roots += [r for r in src.recipe.roots if r not in roots]
        self.roots = roots


@dataclass(eq=False)
class VirtualObject:
    handle: int = 0
    is_token: bool | None = None
    identity: ObjectIdentity | None = None
    real: dict[Member, int] = field(default_factory=dict)
    owner: VirtualSession | None = None  # the session that made a session object
    recipe: Recipe | None = None
    home: Member | None = None  # a token object written under write_policy "primary"
    missing: set[Member] = field(default_factory=set)  # members known not to hold it
    group: Group | None = None  # the token it is on (set when a member handle is known)
    private: bool | None = None  # CKA_PRIVATE: its handle ends when the application logs out
    destroyed: bool = False  # (session object) by the application; kept as a recipe source
    lost: str = ""  # why a session object could not be remade: its uses fail
    edits: list[Any] = field(default_factory=list)  # C_SetAttributeValue templates since made
    _used: bool = False

    @property
    def used(self) -> bool:
        """A call that named it succeeded (its bits have shown)."""
        return self._used

    @used.setter
    def used(self, value: bool) -> None:
        self._used = value
        if value and self.recipe is not None:
            for root in self.recipe.roots:
                root.used = True

    def held(self) -> bool:
        """Held by a member still in service."""
        return any(m.health.usable for m in self.real)

    def homed(self) -> Member | None:
        """(a token object) The one member it is on when written there through p11p
        (write_policy "primary"): by this application (`home`), or by another (the
        group's record: this application's handle came from a search)."""
        if self.home is not None or not self.is_token or self.group is None \
                or self.identity is None:
            return self.home
        return self.group.homes.get(self.identity)

    def source_homes(self) -> set[Member] | None:
        """(a session object) The members it can be made on when its recipe needs token
        objects that one member holds (written under write_policy "primary", or made
        at random on one member): their homes. None: no such source."""
        homes: set[Member] | None = None
        for src in self.recipe.sources.values() if self.recipe is not None else ():
            home = src.homed()
            h = {home} if home is not None else src.source_homes()
            if h is not None:
                homes = h if homes is None else homes & h
        return homes

    def sources_missing(self) -> set[Member]:
        """(a session object) The members known to lack an object its recipe needs (a
        token object found missing there, or what such a source was made from): it
        cannot be made there."""
        out: set[Member] = set()
        for src in self.recipe.sources.values() if self.recipe is not None else ():
            out |= {m for m in src.missing if m not in src.real} | src.sources_missing()
        return out

    def random_held(self) -> bool:
        """Made from a random key, and held by a member still in service."""
        return bool(self.recipe is not None and self.recipe.roots
                    and any(m.health.usable for m in self.real))

    def pinned(self, vs: VirtualSession) -> bool:
        """Made from a random key an object of another session than `vs` still holds on
        a member in service: made again elsewhere, it would not match that object (a
        copy would be of another key), so it stays on its member (resolve.ensure_object:
        random_held) and `vs`'s member session there is not closed at will."""
        for root in self.recipe.roots if self.recipe is not None else ():
            for out in root.outputs:
                if out is not None and out is not self and out.is_token is False \
                        and out.owner is not vs and not out.destroyed and out.held():
                    return True
        return False

    @property
    def replayable(self) -> bool:
        """Can be made again on another member, with the same bits."""
        r = self.recipe
        if r is None or any(root.used for root in r.roots):
            return False
        return all(src.is_token or src.replayable for src in r.sources.values())


@dataclass
class FindState:
    template: Any
    returned: list[int] = field(default_factory=list)
    pending: list[int] | None = None  # after a replay: what is left, answered by p11p
    # answered from the context's find cache: the member session has no find running
    cached: bool = False


@dataclass(eq=False)
class VirtualSession:
    handle: int
    context: ApplicationContext
    group: Group
    flags: int
    member: Member | None = None
    real: dict[Member, int] = field(default_factory=dict)
    ops: dict[str, Operation] = field(default_factory=dict)
    find: FindState | None = None
    objects: set[VirtualObject] = field(default_factory=set)
    direct: Binding | None = None  # bound to its member session for the data plane
    # the binding the daemon ended last: while its member session stays the session's,
    # the operations the client ran there still run there (DIRECT_ADOPT takes them)
    left: Binding | None = None
    # operations that could not be rebuilt on another member (kind -> why): the next
    # call of that operation gets CKR_DEVICE_ERROR; a new init starts afresh
    lost: dict[str, str] = field(default_factory=dict)
    # member sessions opened only to remake one of its objects for another session: its
    # operations and search are not there yet (prepare replays them at its next call)
    bare: set[Member] = field(default_factory=set)

    def bind(self, binding: Binding) -> None:
        self.direct = binding
        binding.member.health.bound += 1

    def unbind(self) -> Binding | None:
        """Ends the binding (the caller revokes it at the helper when that lives)."""
        binding = self.direct
        if binding is not None:
            self.direct = None
            self.left = binding
            binding.member.health.bound -= 1
        return binding

    @property
    def idle(self) -> bool:
        """Holds nothing the daemon recorded: no operation, no search, no live session
        object."""
        return not self.ops and self.find is None and all(o.lost for o in self.objects)

    @property
    def movable(self) -> bool:
        """May run its next call on another member (balance, failback). Not while bound:
        its member session may hold operations of the data plane that the daemon did not
        see (the client keeps what their replay needs; a move revokes the binding)."""
        return self.direct is None and self.idle

    def describe(self) -> str:
        return f"{self.context.name} session={self.handle} group={self.group.label}"
