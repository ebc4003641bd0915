"""The helper link itself: the ready frame, the helper's own codes, requests of the
wrong shape, frames that break the protocol, and how the helper ends (C_Finalize, EOF).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from helperfixtures import *  # noqa: F403  (the fixtures)
from helperlink import SOFTHSM_SO, HelperLink, template
from p11p.protocol.constants import CKA, CKR, CKS
from p11p.protocol.framing import encode

Spawn = Callable[..., HelperLink]


def test_ready_frame_carries_the_pid(helper: HelperLink) -> None:
    assert helper.ready == [0, CKR["CKR_OK"], helper.pid, ["cpu_hint", "pairs", "mailbox"]]  # what its data plane takes


def test_ping(helper: HelperLink) -> None:
    assert helper.call(-1) == [CKR["CKR_OK"], helper.pid]


def test_initialize_is_already_done(helper: HelperLink) -> None:
    assert helper.call(1) == [CKR["CKR_CRYPTOKI_ALREADY_INITIALIZED"]]


@pytest.mark.parametrize("code", [999, 4, -99, 2**40])
def test_unknown_codes_are_not_supported(helper: HelperLink, code: int) -> None:
    assert helper.call(code) == [CKR["CKR_FUNCTION_NOT_SUPPORTED"]]


def test_get_info_is_forwarded(helper: HelperLink) -> None:
    version, manufacturer, flags, description, library_version = helper.ok(3, 0)[0]
    assert version[0] == 2 and manufacturer.startswith(b"SoftHSM")
    assert len(manufacturer) == 32 and len(description) == 32 and len(library_version) == 2


BAD_REQUESTS: list[tuple[str, list[Any]]] = [
    ("no function code", []),
    ("a code that is not an integer", ["C_Sign"]),
    ("too few arguments", [44, 1]),
    ("too many arguments", [65, 1, 8, 9]),
    ("a str for bytes", [44, 1, "data", 64]),
    ("a negative ulong", [14, -1]),
    ("the most negative int64", [14, -2**63]),
    ("a boolean for a ulong", [14, True]),
    ("a bbool of 2", [5, 2, None]),
    ("an output pointer that is not 0", [13, 1, 6, 5]),
    ("a label of 31 bytes", [10, 1, b"1234", b"x" * 31]),
    ("an attribute without a value", [27, 1, [[CKA["CKA_LABEL"]]]]),
    ("a nested template for a byte attribute", [27, 1, [[CKA["CKA_LABEL"], [[0, b"x"]]]]]),
    ("bytes for a template attribute", [27, 1, [[CKA["CKA_WRAP_TEMPLATE"], b"\0" * 24]]]),
    ("a room that is bytes", [25, 1, 2, [[CKA["CKA_LABEL"], b"x"]]]),
    ("an int room for a template attribute", [25, 1, 2, [[CKA["CKA_WRAP_TEMPLATE"], 48]]]),
    ("templates nested five deep", [27, 1, [[CKA["CKA_WRAP_TEMPLATE"], [[CKA["CKA_WRAP_TEMPLATE"], [
        [CKA["CKA_WRAP_TEMPLATE"], [[CKA["CKA_WRAP_TEMPLATE"], [[CKA["CKA_WRAP_TEMPLATE"], [
        ]]]]]]]]]]]]),
    ("a mechanism without its parameter", [43, 1, [0x1041], 2]),
    ("a structured parameter for a mechanism without one", [43, 1, [0x1041, [1]], 2]),
    ("a GCM parameter with a field missing", [30, 1, [0x1087, [b"iv", 96, None]], 2]),
    ("a CTR counter block of 15 bytes", [30, 1, [0x1086, [128, b"x" * 15]], 2]),
    ("a PIN that is a str", [19, 1, 1, "1234secret"]),
    ("C_Finalize with an argument", [2, 0]),
]


@pytest.mark.parametrize("what,request_", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_requests_of_the_wrong_shape_are_arguments_bad(
        helper: HelperLink, what: str, request_: list[Any]) -> None:
    call_id = helper.new_id()
    helper.write(encode([call_id, *request_]))
    assert helper.reply(call_id) == [call_id, CKR["CKR_ARGUMENTS_BAD"]], what
    assert helper.call(-1) == [0, helper.pid]  # and the helper goes on serving


def test_a_pin_is_never_logged(helper: HelperLink) -> None:
    helper.call(19, 1, 1, "1234secret")
    helper.call(-1)
    assert not any("1234secret" in line for line in helper.stderr_lines)


def test_output_capacities_too_large_for_a_frame(helper: HelperLink, session: int) -> None:
    # random data cannot be shortened: refused; a buffer is lowered to what can travel
    assert helper.call(65, session, 2**40) == [CKR["CKR_HOST_MEMORY"]]
    assert helper.call(38, session, [0x250, None]) == [CKR["CKR_OK"]]  # SHA-256
    rv, digest = helper.call(39, session, b"abc", 2**63)
    assert rv == CKR["CKR_OK"] and len(digest) == 32


def test_request_without_a_call_id_ends_the_helper(spawn: Spawn) -> None:
    link = spawn()
    link.write(encode("hello"))
    assert link.wait_exit() == 1
    time.sleep(0.1)
    assert any("call id" in line for line in link.stderr_lines)


def test_call_id_zero_ends_the_helper(spawn: Spawn) -> None:
    link = spawn()
    link.write(encode([0, -1]))
    assert link.wait_exit() == 1


def test_a_frame_that_is_not_msgpack_ends_the_helper(spawn: Spawn) -> None:
    link = spawn()
    link.write(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    assert link.wait_exit() == 1


def test_eof_finalizes_and_exits_cleanly(spawn: Spawn) -> None:
    link = spawn()
    assert link.call(-1) == [0, link.pid]
    assert link.proc.stdin is not None
    link.proc.stdin.close()
    assert link.wait_exit() == 0
    time.sleep(0.1)
    assert not [line for line in link.stderr_lines if "ERROR" in line or "WARNING" in line]


def test_finalize_replies_then_exits(spawn: Spawn) -> None:
    link = spawn()
    assert link.call(2) == [CKR["CKR_OK"]]
    assert link.wait_exit() == 0


def test_calls_in_flight_are_answered_before_finalize(spawn: Spawn) -> None:
    link = spawn()
    ids = [link.send(65, 0, 32) for _ in range(20)]  # slot 0 is not a session: fails fast
    final = link.send(2)
    replies = [link.reply(i) for i in ids]
    assert all(r[1] == CKR["CKR_SESSION_HANDLE_INVALID"] for r in replies)
    assert link.reply(final) == [final, CKR["CKR_OK"]]
    assert link.wait_exit() == 0


def test_a_module_that_does_not_load(spawn: Spawn, tmp_path: Any) -> None:
    link = spawn(str(tmp_path / "absent.so"))
    assert link.ready[:2] == [0, CKR["CKR_GENERAL_ERROR"]]
    assert "absent.so" in link.ready[2]
    assert link.wait_exit() == 1


def test_a_library_that_is_not_pkcs11(spawn: Spawn) -> None:
    libz = next(p for p in ("/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1",
                            "/lib/aarch64-linux-gnu/libz.so.1") if os.path.exists(p))
    link = spawn(libz)
    assert link.ready == [0, CKR["CKR_GENERAL_ERROR"], f"no C_GetFunctionList in {libz}"]
    assert link.wait_exit() == 1


def test_initialize_failure_is_reported(spawn: Spawn, tmp_path: Any) -> None:
    env = {**os.environ, "SOFTHSM2_CONF": str(tmp_path / "missing.conf")}
    link = spawn(SOFTHSM_SO, env)
    assert link.ready[0] == 0 and link.ready[1] != CKR["CKR_OK"]
    assert "C_Initialize" in link.ready[2]
    assert link.wait_exit() == 1


def test_template_helper() -> None:
    assert template(LABEL=b"x") == [[CKA["CKA_LABEL"], b"x"]]


def test_random_round_trip_time(helper: HelperLink, session: int) -> None:
    """Time of one C_GenerateRandom(32) through the helper's pipes, from Python."""
    for _ in range(50):
        helper.call(65, session, 32)
    n = 1000
    start = time.perf_counter()
    for _ in range(n):
        rv, data = helper.call(65, session, 32)
    per_call = (time.perf_counter() - start) / n
    assert rv == 0 and len(data) == 32
    print(f"C_GenerateRandom(32) round trip through the helper: {per_call * 1e6:.0f} us")
    assert per_call < 0.005


def test_functions_with_silent_arguments_reach_the_module(helper: HelperLink, session: int) -> None:
    # C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, NULL): no slot event happened
    assert helper.call(68, 1, 0) == [CKR["CKR_NO_EVENT"], None]
    assert helper.call(66, session) == [CKR["CKR_FUNCTION_NOT_PARALLEL"]]
    assert helper.call(67, session) == [CKR["CKR_FUNCTION_NOT_PARALLEL"]]


def test_wrong_pin_then_right_pin(spawn: Spawn) -> None:
    link = spawn()
    slot = link.token_slot()
    session = link.open_session(slot, login=False)
    assert link.call(19, session, 1, b"0000wrong") == [CKR["CKR_PIN_INCORRECT"]]
    assert link.call(19, session, 1, b"1234") == [CKR["CKR_OK"]]
    assert link.call(20, session) == [CKR["CKR_OK"]]
    assert not any("0000wrong" in line for line in link.stderr_lines)


RECYCLE, ADOPTABLE, KEPT, KEEP = -10, -7, -8, -9


def test_recycle_leaves_the_module_as_the_next_application_finds_it(helper: HelperLink,
                                                                   slot: int) -> None:
    """RECYCLE (daemon/pool.py): no longer adoptable and nothing kept, every session of
    the slot closed (the login with them), a new session public; one request."""
    old = [helper.open_session(slot), helper.open_session(slot, login=False)]
    name = f"p11p-test-recycle-{os.getpid()}".encode()
    assert helper.call(ADOPTABLE, name, b"t" * 16, os.getuid(), 5000, os.getpid(),
                       b"k" * 32) == [CKR["CKR_OK"]]
    assert helper.call(KEEP, 1, b"1234") == [CKR["CKR_OK"]]
    assert helper.call(RECYCLE, slot, b"", b"n" * 16, 0xFFFFFFFF) == \
        [CKR["CKR_OK"], CKS["CKS_RO_PUBLIC_SESSION"]]
    assert helper.call(KEPT) == [CKR["CKR_OK"]]  # the key and the PIN wiped
    for session in old:
        assert helper.call(16, session, 0)[0] == CKR["CKR_SESSION_HANDLE_INVALID"]
    fresh = helper.open_session(slot, login=False)
    assert helper.ok(16, fresh, 0)[0][1] == CKS["CKS_RW_PUBLIC_SESSION"]  # logged out


@pytest.mark.parametrize("args", [[], [1], [1, "name", b"n" * 16, 0], [-1, b"", b"n" * 16, 0],
                                  [1, b"", b"n" * 16]])
def test_recycle_with_bad_arguments_is_refused(helper: HelperLink, args: list[Any]) -> None:
    assert helper.call(RECYCLE, *args) == [CKR["CKR_ARGUMENTS_BAD"]]


def test_recycle_of_a_slot_that_does_not_exist_says_so(helper: HelperLink) -> None:
    assert helper.call(RECYCLE, 0xDEAD, b"", b"n" * 16, 0)[0] == CKR["CKR_SLOT_ID_INVALID"]
