"""The Cryptoki function and mechanism-parameter tables, read from the .spec files.

functions.spec and mechanisms.spec (beside this file) are the single description of
what travels (and functions.spec the versions and features the client link speaks);
this module turns them into typed tables for the daemon, the helper and the
generators. Nothing else in Python lists functions by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Kinds of input arguments: one wire element each.
IN_KINDS = frozenset(
    {"ulong", "bbool", "slot", "session", "object", "bytes", "pin", "label32", "template",
     "mechanism"}
)
# Kinds of output arguments: one wire element in the request (NULL or capacity) and one
# in the reply.
OUT_KINDS = frozenset(
    {"out_bytes", "out_random", "out_ulong", "out_slot", "out_session", "out_object",
     "out_slots", "out_mechs", "out_objects", "out_info", "out_slot_info",
     "out_token_info", "out_mech_info", "out_session_info"}
)
# template_get is both: one element in the request, one in the reply.
INOUT_KINDS = frozenset({"template_get"})
# Kinds that never travel.
SILENT_KINDS = frozenset({"notify", "reserved"})
ALL_KINDS = IN_KINDS | OUT_KINDS | INOUT_KINDS | SILENT_KINDS

FIELD_KINDS = frozenset({"ulong", "bbool", "bytes", "fixed16", "fixed8", "object"})

# Roles of object handles (`object:hKey=key`), each with the CK_RV an unknown handle in
# that role gets, as the reference token (SoftHSM2) answers it: C_DeriveKey's base key,
# like the key of an operation's init, is an object to it. An `object` without a role is
# an object.
HANDLE_ROLES = {
    "object": "CKR_OBJECT_HANDLE_INVALID",
    "key": "CKR_KEY_HANDLE_INVALID",
    "base_key": "CKR_OBJECT_HANDLE_INVALID",
    "wrapping_key": "CKR_WRAPPING_KEY_HANDLE_INVALID",
    "unwrapping_key": "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
}


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a Cryptoki function (a pointer+length pair counts as one)."""

    kind: str
    cnames: tuple[str, ...]
    role: str = ""  # for object handles: a key of HANDLE_ROLES

    @property
    def travels(self) -> bool:
        return self.kind not in SILENT_KINDS

    @property
    def is_output(self) -> bool:
        return self.kind in OUT_KINDS or self.kind in INOUT_KINDS


@dataclass(frozen=True, slots=True)
class Function:
    """One Cryptoki function (or one of p11p's own codes): its wire code, name,
    arguments, and what it means (functions.spec, "Line format")."""

    code: int
    name: str
    local: bool
    args: tuple[Arg, ...]
    op_kind: str = ""  # the operation it belongs to (encrypt, sign, find, ...)
    op_role: str = ""  # init, update, final or oneshot
    opaque: bool = False  # its effect on operations is not recorded (not replayable)
    writes: str = ""  # what it writes to the token (create, copy, ..., destroy, set)
    login: str = ""  # "login" or "logout"
    blocks: bool = False  # may wait for an outside event as long as it likes
    reads: bool = False  # reads an object's attributes
    daemon: str = ""  # the daemon's own handler (a Dispatcher method), else the router's
    client: str = ""  # "hand": the client's entry point is hand-written; "wrapped": it
    #                   wraps the generated stub (p11p_wire_NAME)
    direct: bool = False  # the data plane: a helper serves it on a bound session

    @property
    def wire_args(self) -> tuple[Arg, ...]:
        """The arguments that travel in the request, in order."""
        return tuple(a for a in self.args if a.travels)

    @property
    def outputs(self) -> tuple[Arg, ...]:
        """The arguments that come back in the reply, in order."""
        return tuple(a for a in self.args if a.is_output)


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a structured mechanism parameter."""

    kind: str
    cnames: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ParamStruct:
    """A mechanism parameter structure that travels field by field."""

    name: str
    ctype: str
    fields: tuple[Field, ...]


@dataclass(frozen=True, slots=True)
class Mechanism:
    """A mechanism type whose parameter is a structure."""

    name: str
    value: int
    param: ParamStruct


class SpecError(ValueError):
    """A .spec file that does not parse; names the file and line."""


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    out = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.split("#", 1)[0].split()
        if text:
            out.append((number, text))
    return out


def _split_arg(path: Path, number: int, word: str, kinds: frozenset[str]) -> tuple[str, tuple[str, ...]]:
    kind, sep, names = word.partition(":")
    if not sep or kind not in kinds or not names or "=" in names:
        raise SpecError(f"{path}:{number}: bad argument {word!r}")
    return kind, tuple(names.split(","))


def _function_arg(path: Path, number: int, word: str) -> Arg:
    """`KIND:CNAME[,CNAME]` or, for an object handle, `object:CNAME=ROLE`."""
    word, _, role = word.partition("=")
    kind, names = _split_arg(path, number, word, ALL_KINDS)
    if kind == "object":
        role = role or "object"
        if role not in HANDLE_ROLES:
            raise SpecError(f"{path}:{number}: unknown handle role {role!r}")
    elif role:
        raise SpecError(f"{path}:{number}: a role is for object handles only: {word!r}")
    return Arg(kind, names, role)


OP_ROLES = frozenset({"init", "update", "final", "oneshot"})
WRITES = frozenset({"create", "copy", "generate", "unwrap", "derive", "destroy", "set", "token",
                    "pin"})
# the writes that make a new object
CREATES = frozenset({"create", "copy", "generate", "unwrap", "derive"})


def _function(path: Path, number: int, code: str, name: str, rest: list[str]) -> Function:
    meaning: dict[str, object] = {}
    for flag in (w for w in rest if w.startswith("@")):
        key, _, value = flag[1:].partition("=")
        if key == "op":
            kind, _, role = value.partition(":")
            if not kind or role not in OP_ROLES:
                raise SpecError(f"{path}:{number}: bad operation flag {flag!r}")
            meaning["op_kind"], meaning["op_role"] = kind, role
        elif key == "writes" and value in WRITES:
            meaning["writes"] = value
        elif key in ("login", "logout") and not value:
            meaning["login"] = key
        elif key in ("opaque", "blocks", "reads", "direct") and not value:
            meaning[key] = True
        elif key == "daemon" and value.isidentifier():
            meaning["daemon"] = value
        elif key == "client" and value in ("hand", "wrapped"):
            meaning["client"] = value
        elif key != "local" or value:
            raise SpecError(f"{path}:{number}: unknown flag {flag!r}")
    args = tuple(_function_arg(path, number, w) for w in rest if not w.startswith("@"))
    try:
        return Function(int(code), name, "@local" in rest, args, **meaning)  # type: ignore[arg-type]
    except ValueError:
        raise SpecError(f"{path}:{number}: bad code {code!r}") from None


def _parse() -> tuple[tuple[Function, ...], tuple[Function, ...]]:
    path = HERE / "functions.spec"
    cryptoki, own = [], []
    for number, words in _lines(path):
        if words[0] == "link":
            continue  # link_protocol()
        if words[0] == "p11p":
            own.append(_function(path, number, words[1], words[2], words[3:]))
        else:
            cryptoki.append(_function(path, number, words[0], words[1], words[2:]))
    codes = [f.code for f in cryptoki]
    if codes != list(range(1, len(cryptoki) + 1)):
        raise SpecError(f"{path}: function codes must be 1..N in order")
    if any(0 <= f.code <= len(cryptoki) for f in own) or len({f.code for f in own}) < len(own):
        raise SpecError(f"{path}: p11p's own codes must be unique and outside 0..N")
    return tuple(cryptoki), tuple(own)


@cache
def functions() -> tuple[Function, ...]:
    """All Cryptoki functions, in code order."""
    return _parse()[0]


@cache
def own_codes() -> dict[str, Function]:
    """p11p's own codes by name: FIND_ALL and the data plane's on the client link
    (over 1000), the helper's direct-path controls on its pipe (negative)."""
    return {f.name: f for f in _parse()[1]}


@cache
def direct_functions() -> tuple[Function, ...]:
    """The data plane: the functions a helper serves on a bound session (`@direct`)."""
    return tuple(f for f in functions() if f.direct)


@cache
def by_code() -> dict[int, Function]:
    return {f.code: f for f in functions()}


@cache
def by_name() -> dict[str, Function]:
    return {f.name: f for f in functions()}


@dataclass(frozen=True, slots=True)
class LinkProtocol:
    """What this build speaks on the client link: the oldest and newest protocol
    versions and the named features it knows (functions.spec, `link` lines)."""

    min_version: int
    max_version: int
    features: tuple[str, ...]


FEATURE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@cache
def link_protocol() -> LinkProtocol:
    path = HERE / "functions.spec"
    versions: tuple[int, int] | None = None
    features: list[str] = []
    for number, words in _lines(path):
        if words[0] != "link":
            continue
        if words[1:2] == ["versions"] and len(words) == 4 and versions is None \
                and all(w.isdigit() for w in words[2:]):
            versions = (int(words[2]), int(words[3]))
            if not 1 <= versions[0] <= versions[1] < 2**32:
                raise SpecError(f"{path}:{number}: versions must be 1 <= MIN <= MAX < 2**32")
        elif words[1:2] == ["feature"] and len(words) == 3 and FEATURE_NAME.fullmatch(words[2]) \
                and words[2] not in features:
            features.append(words[2])
        else:
            raise SpecError(f"{path}:{number}: expected 'link versions MIN MAX' (once) or "
                            f"'link feature NAME' (a new lower-case name)")
    if versions is None:
        raise SpecError(f"{path}: no 'link versions MIN MAX' line")
    return LinkProtocol(versions[0], versions[1], tuple(features))


@cache
def mechanisms() -> dict[int, Mechanism]:
    """Mechanism types with structured parameters, by type value."""
    path = HERE / "mechanisms.spec"
    params: dict[str, ParamStruct] = {}
    mechs: dict[int, Mechanism] = {}
    for number, words in _lines(path):
        if words[0] == "param":
            _, name, ctype, *fields = words
            params[name] = ParamStruct(
                name, ctype, tuple(Field(*_split_arg(path, number, w, FIELD_KINDS)) for w in fields)
            )
        elif words[0] == "mech":
            _, name, value, pname = words
            if pname not in params:
                raise SpecError(f"{path}:{number}: unknown param {pname!r}")
            mechs[int(value, 0)] = Mechanism(name, int(value, 0), params[pname])
        else:
            raise SpecError(f"{path}:{number}: expected 'param' or 'mech'")
    return mechs


@cache
def param_structs() -> tuple[ParamStruct, ...]:
    seen: dict[str, ParamStruct] = {}
    for m in mechanisms().values():
        seen.setdefault(m.param.name, m.param)
    return tuple(seen.values())
