"""The hello of the client link: which protocol version and features a connection speaks.

Sans-IO: `negotiate` takes a connection's first frame and gives the answer to write and
either the agreement or the refusal (protocol/README.md "Client link: hello"). The
client offers the oldest version it speaks in `p11p` and the newest in `max` (a client
without `max` speaks only `p11p`); the connection speaks the newest version both speak,
and the features both know. A client without `features` gets exactly the answer of a
daemon that knew none (`{"p11p": version}`), so a client library older than this daemon
reads what it always read.

The versions and features are functions.spec's `link` lines. VERSIONS and FEATURES are
read at each hello, so a test may start a daemon that pretends another range by setting
them before the daemon runs (tests/integration/test_hello_versions.py); nothing else
changes them.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

from p11p.protocol import spec

_LINK = spec.link_protocol()
VERSIONS: tuple[int, int] = (_LINK.min_version, _LINK.max_version)
FEATURES: tuple[str, ...] = _LINK.features
# The features the connection a call came on agreed (set by the connection's task; a
# handler whose answer depends on one reads it here).
AGREED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("p11p_agreed", default=())


@dataclass(frozen=True, slots=True)
class Resumption:
    """What a client library keeps for a daemon that lost its application's state (hello
    `resume`): the state file's key and the logins it made, (slot, user type, PIN) each.
    Never printed: its repr names no secret."""

    key: bytes = field(repr=False)
    logins: tuple[tuple[int, int, bytes], ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Agreement:
    """An accepted hello: what the connection speaks, and who says it is calling."""

    version: int
    features: tuple[str, ...]
    ctx: bytes
    pid: int
    prog: str
    resume: Resumption | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused hello. `offered` is the client's range when the hello was well formed
    and only the versions did not meet."""

    why: str
    offered: tuple[int, int] | None = None


def _is_uint(value: object) -> bool:
    return type(value) is int and value >= 0


def refusal_answer(why: str) -> dict[str, Any]:
    """The answer to a refused hello: the daemon's range (lowest in `p11p`, as a hello
    gives it) and why."""
    low, high = VERSIONS
    return {"p11p": low, "max": high, "error": why}


def _range_text(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}..{high}"


_PIN_MAX = 256  # bytes of a PIN the client library keeps (client/kept.c)


def _resumption(value: object) -> Resumption | None:
    """The hello's `resume` ({"key": bin(32), "logins": [[slot, user_type, pin], ...]}),
    or None when it is malformed."""
    if not isinstance(value, dict):
        return None
    key, logins = value.get("key"), value.get("logins", [])
    if not isinstance(key, bytes) or len(key) != 32 or not isinstance(logins, list) \
            or len(logins) > 64:
        return None
    kept: list[tuple[int, int, bytes]] = []
    for login in logins:
        if not (isinstance(login, list) and len(login) == 3 and _is_uint(login[0])
                and _is_uint(login[1]) and isinstance(login[2], bytes)
                and len(login[2]) <= _PIN_MAX):
            return None
        kept.append((login[0], login[1], login[2]))
    return Resumption(key, tuple(kept))


def negotiate(frame: Any) -> tuple[Agreement | Refusal, dict[str, Any]]:
    """The outcome of a connection's first frame, and the answer to write."""
    ok = (isinstance(frame, dict) and _is_uint(frame.get("p11p"))
          and _is_uint(frame.get("max", frame.get("p11p")))
          and isinstance(frame.get("ctx"), bytes) and len(frame["ctx"]) == 16
          and isinstance(frame.get("pid", 0), int) and isinstance(frame.get("prog", ""), str)
          and isinstance(frame.get("features", []), list)
          and all(isinstance(f, str) for f in frame.get("features", [])))
    if not ok:
        refusal = Refusal("malformed hello")
        return refusal, refusal_answer(refusal.why)
    low, high = frame["p11p"], frame.get("max", frame["p11p"])
    if high < low:
        refusal = Refusal(f"malformed hello: max {high} is below p11p {low}")
        return refusal, refusal_answer(refusal.why)
    ours = VERSIONS
    version = min(high, ours[1])
    if version < max(low, ours[0]):
        refusal = Refusal(f"no protocol version in common: the client speaks "
                          f"{_range_text(low, high)}, this daemon {_range_text(*ours)}",
                          (low, high))
        return refusal, refusal_answer(refusal.why)
    answer: dict[str, Any] = {"p11p": version}
    features: tuple[str, ...] = ()
    if "features" in frame:
        offered = set(frame["features"])
        features = tuple(f for f in FEATURES if f in offered)
        answer["features"] = list(features)
    resume = None
    if "resume" in features and "resume" in frame:  # else an unknown key, ignored
        resume = _resumption(frame["resume"])
        if resume is None:
            refusal = Refusal("malformed hello: resume")
            return refusal, refusal_answer(refusal.why)
    return Agreement(version, features, frame["ctx"], frame.get("pid", 0),
                     str(frame.get("prog", ""))[:200], resume), answer
