"""Hostile input on the client socket (issue 6): random and mutated frames of every
function of protocol/functions.spec (wrong types, lengths, handles, nesting,
truncation), broken framing and hellos. Throughout, the daemon lives, answers every
request with a CK_RV or closes the connection (never hangs), logs no escaped
exception, and keeps serving a well-behaved application (tests/hostile/hostile_arena.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from hostile_arena import MAX_FRAME, NOUTS, Arena
from hostile_frames import (
    FIND_ALL,
    Frame,
    Known,
    bad_hellos,
    find_all,
    frame_bytes,
    frames,
    mutated,
    prelude,
    request_frame,
    requests,
    well_formed,
)
from hostile_wire import PROTOCOL_VERSION, Closed, Hang, Wire, hello_map
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from p11p.protocol import spec

# Reproducible in CI (the same examples every run) and still random and mutated input;
# no example database is written into the tree.
SETTINGS: dict[str, Any] = dict(
    deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
ALL_CODES = [f.code for f in spec.functions()] + [FIND_ALL]
# Functions whose arguments have room for it (templates, mechanisms, data) get more
# examples than those with a handle or two.
RICH_KINDS = {"template", "template_get", "mechanism", "bytes", "pin"}
RICH = [c for c in ALL_CODES if c == FIND_ALL
        or any(a.kind in RICH_KINDS for a in spec.by_code()[c].wire_args)]
PLAIN = [c for c in ALL_CODES if c not in RICH]


def _name(code: int) -> str:
    return spec.by_code()[code].name if code in spec.by_code() else f"FIND_ALL_{code}"


@pytest.mark.parametrize("code", RICH, ids=_name)
@settings(max_examples=9, **SETTINGS)
@given(data=st.data())
def test_every_function_valid_and_mutated(served: Arena, code: int, data: st.DataObject) -> None:
    """Requests of one function: well formed (with random values and handles) and
    mutated; each is answered [rv] or [rv, outs...]."""
    _function_example(served, code, data)


@pytest.mark.parametrize("code", PLAIN, ids=_name)
@settings(max_examples=4, **SETTINGS)
@given(data=st.data())
def test_every_plain_function_valid_and_mutated(served: Arena, code: int,
                                                data: st.DataObject) -> None:
    """As above, for the functions that take only handles, integers and outputs."""
    _function_example(served, code, data)


def test_every_function_is_covered() -> None:
    assert sorted(RICH + PLAIN) == sorted(ALL_CODES)
    assert len(ALL_CODES) == len(spec.functions()) + 1


def _function_example(served: Arena, code: int, data: st.DataObject) -> None:
    def frames_of(known: Known) -> list[Frame]:
        base = find_all(known) if code == FIND_ALL else well_formed(spec.by_code()[code], known)
        one = st.one_of(base, base.flatmap(lambda r: mutated(r, known)))
        start = data.draw(prelude(spec.by_code()[code], known), label="prelude") \
            if code in spec.by_code() else []
        reqs = data.draw(st.lists(one, min_size=1, max_size=4), label="requests")
        return [request_frame(req, MAX_FRAME) for req in start + reqs]
    served.example(frames_of)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_mixed_frames_and_broken_framing(served: Arena, data: st.DataObject) -> None:
    """Requests of any function mixed with frames that break the protocol: not an array,
    empty, truncated, oversize, trailing bytes, garbage, a frame in pieces."""
    served.example(lambda known: data.draw(st.lists(frames(known, MAX_FRAME), min_size=1,
                                                    max_size=6), label="frames"))


@settings(max_examples=40, **SETTINGS)
@given(first=bad_hellos())
def test_bad_hellos_are_refused(served: Arena, first: bytes) -> None:
    """Whatever comes instead of a proper hello, the connection ends (with an error
    answer when the frame could be read) and nothing else happens."""
    with Wire(served.daemon.socket, timeout=10) as w:
        if not w.send_raw(first):
            return
        try:
            answer = w.recv(timeout=2)
        except Closed:
            return
        except Hang:
            # an incomplete frame (garbage that reads as a long length): the daemon waits
            # for the rest, as it should; it must still not take a request
            w.send_raw(frame_bytes([5, 0, None]))
            try:
                answer = w.recv(timeout=1)
            except (Closed, Hang):
                return
        assert type(answer) is dict and answer.get("p11p") == PROTOCOL_VERSION \
            and isinstance(answer.get("error"), str), answer
        assert w.wait_closed(5)
    served.assert_alive()


def test_garbage_before_hello_then_good_client(served: Arena) -> None:
    """Random bytes, then a proper hello on a new connection: accepted and served."""
    for size in (1, 3, 4, 5, 100, 5000):
        with Wire(served.daemon.socket, timeout=10) as w:
            w.send_raw(os.urandom(size))
    with Wire(served.daemon.socket) as w:
        w.hello(os.urandom(16))
        assert w.call([5, 1, None])[0] == 0
    served.assert_alive()


@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_pipelined_requests_answered_in_order(served: Arena, data: st.DataObject) -> None:
    """Several requests in one write (a client that does not wait): one reply each, in
    order."""
    def frames_of(known: Known) -> list[Frame]:
        answered = requests(known).filter(
            lambda r: request_frame(r, MAX_FRAME).expect == "reply")
        reqs = data.draw(st.lists(answered, min_size=2, max_size=8), label="pipelined")
        return [Frame(b"".join(frame_bytes(r) for r in reqs), "pipelined", reqs)]

    def run(w: Wire, frames: list[Frame]) -> None:
        (f,) = frames
        for req in f.request:
            served.note_finalize(req)
        assert w.send_raw(f.data)
        for req in f.request:
            served.check_reply(req, w.recv())

    served.example(frames_of, run)


@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_fresh_contexts_dropped_mid_call(served: Arena, data: st.DataObject) -> None:
    """New application contexts that send requests and go away without reading the
    replies: the daemon ends them (helpers and all) and goes on."""
    ctx = os.urandom(16)
    w = Wire(served.daemon.socket)
    w.hello(ctx)
    reply = w.call([13, 0, 6, 0])
    known = Known(sessions=[reply[1]] if reply[0] == 0 else [])
    reqs = data.draw(st.lists(requests(known), min_size=1, max_size=5), label="requests")
    for req in reqs:
        if not w.send_raw(frame_bytes(req)):
            break
    if data.draw(st.booleans(), label="read one"):
        try:
            w.recv(timeout=10)
        except (Closed, Hang):
            pass
    w.close()
    served.assert_alive()


def test_slow_loris_and_many_idle_connections(served: Arena) -> None:
    """Connections that send a header and nothing more, and many idle ones: the others
    are served meanwhile."""
    idle = []
    try:
        for i in range(60):
            w = Wire(served.daemon.socket)
            if i % 2:
                w.send_raw(frame_bytes(hello_map(os.urandom(16)))[:7])
            idle.append(w)
        t = time.monotonic()
        served.good.check()
        assert time.monotonic() - t < 5
    finally:
        for w in idle:
            w.close()
    served.assert_alive()


def test_reply_shapes_cover_every_function() -> None:
    """The checks know the reply length of every function of the spec."""
    own = {f.code for f in spec.own_codes().values() if f.code > 1000}  # the client link's
    assert set(NOUTS) == {f.code for f in spec.functions()} | own
