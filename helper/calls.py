"""The helper's call table: for every function of protocol/functions.spec that the
helper forwards, its compiled shim and one converter per argument that travels, made
once at start. A Plan runs one request: wire values to C arguments, the module's call,
outputs back to wire values.
"""

from __future__ import annotations

from typing import Any

from p11p.helper import kinds, mechanisms, structures, templates
from p11p.helper.build_cffi import NOT_FORWARDED, shim_name
from p11p.helper.errors import BadArguments
from p11p.helper.kinds import Converter
from p11p.protocol import spec

CONVERTERS: dict[str, Converter] = {
    **kinds.CONVERTERS, **templates.CONVERTERS, **mechanisms.CONVERTERS,
    **structures.CONVERTERS,
}
# Calls that may block indefinitely by design; C_Finalize does not wait for them.
BLOCKING = frozenset({"C_WaitForSlotEvent"})
# Calls the I/O loop handles itself (C_Finalize ends the process).
OWN_CALLS = frozenset({"C_Finalize"})


class Plan:
    """How to run one Cryptoki function."""

    __slots__ = ("name", "cfunc", "puts", "outputs", "secret", "blocking")

    def __init__(self, fn: spec.Function, cfunc: Any) -> None:
        converters = [CONVERTERS[a.kind] for a in fn.wire_args]
        self.name = fn.name
        self.cfunc = cfunc
        self.puts = tuple(c.put for c in converters)
        # (argument index, get) of each output, in reply order
        self.outputs = tuple((i, c.get) for i, c in enumerate(converters) if c.get is not None)
        self.secret = any(a.kind == "pin" for a in fn.args)
        self.blocking = fn.name in BLOCKING

    def run(self, args: list[Any]) -> list[Any]:
        """[rv, out...] for the wire arguments `args`; BadArguments before the module
        is called if they do not fit."""
        puts = self.puts
        if len(args) != len(puts):
            raise BadArguments(f"{len(puts)} arguments expected, {len(args)} given")
        cargs: list[Any] = []
        states = [put(v, cargs) for put, v in zip(puts, args, strict=False)]
        rv: int = self.cfunc(*cargs)
        reply = [rv]
        for i, get in self.outputs:
            reply.append(get(states[i], rv))
        return reply


def plans(lib: Any) -> dict[int, Plan]:
    """Function code -> Plan, for every function the helper forwards as a call."""
    return {fn.code: Plan(fn, getattr(lib, shim_name(fn.name)))
            for fn in spec.functions() if fn.name not in NOT_FORWARDED | OWN_CALLS}
