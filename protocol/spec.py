"""The Cryptoki function and mechanism-parameter tables, read from the .spec files.

functions.spec and mechanisms.spec (beside this file) are the single description of
what travels; this module turns them into typed tables for the daemon, the helper and
the generators. Nothing else in Python lists functions by hand.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a Cryptoki function (a pointer+length pair counts as one)."""

    kind: str
    cnames: tuple[str, ...]

    @property
    def travels(self) -> bool:
        return self.kind not in SILENT_KINDS

    @property
    def is_output(self) -> bool:
        return self.kind in OUT_KINDS or self.kind in INOUT_KINDS


@dataclass(frozen=True, slots=True)
class Function:
    """One Cryptoki function: its wire code, name and arguments."""

    code: int
    name: str
    local: bool
    args: tuple[Arg, ...]

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
    if not sep or kind not in kinds or not names:
        raise SpecError(f"{path}:{number}: bad argument {word!r}")
    return kind, tuple(names.split(","))


@cache
def functions() -> tuple[Function, ...]:
    """All Cryptoki functions, in code order."""
    path = HERE / "functions.spec"
    result = []
    for number, words in _lines(path):
        code, name, *rest = words
        local = "@local" in rest
        args = tuple(
            Arg(*_split_arg(path, number, w, ALL_KINDS)) for w in rest if not w.startswith("@")
        )
        result.append(Function(int(code), name, local, args))
    codes = [f.code for f in result]
    if codes != list(range(1, len(result) + 1)):
        raise SpecError(f"{path}: function codes must be 1..N in order")
    return tuple(result)


@cache
def by_code() -> dict[int, Function]:
    return {f.code: f for f in functions()}


@cache
def by_name() -> dict[str, Function]:
    return {f.name: f for f in functions()}


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
