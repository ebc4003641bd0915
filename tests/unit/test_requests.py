"""The daemon's typed requests (daemon/gen/requests.py, generated from functions.spec): every
function that travels to the daemon has one; a frame decodes into its fields by name, and
a wire value of the wrong type is CKR_ARGUMENTS_BAD before any handler runs."""

from __future__ import annotations

from typing import Any

import pytest
from p11p.daemon.errors import CKError
from p11p.daemon.gen import requests as R
from p11p.protocol import spec
from p11p.protocol.constants import CKR

CODE = {f.name: f.code for f in spec.functions()}


def test_every_function_that_travels_has_a_typed_request() -> None:
    travels = {f.code for f in spec.functions() if not f.local}
    travels |= {f.code for f in spec.own_codes().values() if f.code > 0}
    assert set(R.DECODERS) == travels


def test_a_frame_decodes_into_named_fields() -> None:
    req = R.decode([CODE["C_Login"], 7, 1, b"1234"])
    assert isinstance(req, R.C_Login)
    assert (req.session, req.user_type, req.pin) == (7, 1, b"1234")
    sign = R.decode([CODE["C_SignInit"], 7, [0x1041, None], 9])
    assert isinstance(sign, R.C_SignInit) and sign.mechanism == [0x1041, None] and sign.key == 9
    wrap = R.decode([CODE["C_WrapKey"], 7, [0x2109, None], 3, 4, None])
    assert isinstance(wrap, R.C_WrapKey)
    assert (wrap.wrapping_key, wrap.key, wrap.wrapped_key) == (3, 4, None)


@pytest.mark.parametrize("frame", [
    [CODE["C_Login"], "7", 1, b"1234"],          # a session handle that is no integer
    [CODE["C_Login"], 7, True, b"1234"],         # msgpack's true is no integer here
    [CODE["C_Login"], -1, 1, b"1234"],           # nor is a negative one
    [CODE["C_Login"], 1 << 64, 1, b"1234"],      # nor one past CK_ULONG's 64 bits
    [CODE["C_Login"], 7, 1, "1234"],             # a PIN as text
    [CODE["C_SignInit"], 7, [0x1041], 9],        # a mechanism without its parameter
    [CODE["C_SignInit"], 7, ["x", None], 9],     # a mechanism type that is no integer
    [CODE["C_FindObjectsInit"], 7, {"a": 1}],    # a template that is a map
    [CODE["C_Sign"], 7, b"data", b"capacity"],   # an output capacity that is bytes
    [CODE["C_InitToken"], 1, b"5678", b"short"],  # a label that is not 32 bytes
])
def test_a_wrong_wire_type_is_arguments_bad(frame: list[Any]) -> None:
    with pytest.raises(CKError) as err:
        R.decode(frame)
    assert err.value.rv == CKR["CKR_ARGUMENTS_BAD"]


def test_the_spec_names_every_handler_of_the_daemon_and_the_client() -> None:
    """functions.spec's @daemon= names a Dispatcher method (the dispatcher's table is
    made from it: no list of function names in the daemon), @client= how the client
    library's entry point is written (client/gen.py makes its stubs from it)."""
    from p11p.daemon.dispatch import Dispatcher
    fns = (*spec.functions(), *spec.own_codes().values())
    named = {f.name: f.daemon for f in fns if f.daemon}
    assert named["C_Login"] == "login" and named["FIND_ALL"] == "find_all"
    assert all(callable(getattr(Dispatcher, h, None)) or h.startswith("direct_")
               for h in named.values()), named
    assert {f.name for f in fns if f.client == "hand"} == {"C_Finalize"}
    assert "C_Sign" in {f.name for f in fns if f.client == "wrapped"}


@pytest.mark.parametrize("flag", ["@daemon=no-such", "@client=other", "@daemon"])
def test_a_bad_handler_flag_names_the_file_and_line(flag: str) -> None:
    from pathlib import Path
    with pytest.raises(spec.SpecError, match=r"functions\.spec:7: unknown flag"):
        spec._function(Path("functions.spec"), 7, "99", "C_X", [flag, "session:hSession"])
