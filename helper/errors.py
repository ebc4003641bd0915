"""Errors inside the helper, the one place where they become a CK_RV, and its logging.

Inside the helper a request that does not fit its function is an exception; at the
process boundary (the reply frame) every call ends as one CK_RV. Logs go to stderr, one
line per event, and never carry argument values (a value may be a PIN).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from p11p.protocol.constants import CKR, rv_name

log = logging.getLogger("p11p.helper")

CKR_OK = CKR["CKR_OK"]
CKR_ARGUMENTS_BAD = CKR["CKR_ARGUMENTS_BAD"]
CKR_FUNCTION_FAILED = CKR["CKR_FUNCTION_FAILED"]
CKR_HOST_MEMORY = CKR["CKR_HOST_MEMORY"]
CKR_GENERAL_ERROR = CKR["CKR_GENERAL_ERROR"]
CKR_FUNCTION_NOT_SUPPORTED = CKR["CKR_FUNCTION_NOT_SUPPORTED"]
CKR_CRYPTOKI_ALREADY_INITIALIZED = CKR["CKR_CRYPTOKI_ALREADY_INITIALIZED"]
CKR_SESSION_COUNT = CKR["CKR_SESSION_COUNT"]


class BadArguments(Exception):
    """A request value that does not fit its argument's kind. The message names the
    argument and what was wrong, never the value."""


class Refused(Exception):
    """Arguments the module is never given, answered with a CK_RV of their own (the
    same as the daemon's shapes.unsafe_arguments and the data plane's fast.c answer)."""

    def __init__(self, rv: int, why: str) -> None:
        super().__init__(why)
        self.rv = rv


class TooLarge(Exception):
    """An output the helper will not allocate: it could not travel back in one frame."""


def rv_for(exc: BaseException, function: str, secret: bool) -> int:
    """The CK_RV that answers a call which raised `exc` before or after the module's
    call; logs it. `secret`: the call carries a PIN, so the exception's text (which
    could quote a value) is left out of the log."""
    if isinstance(exc, BadArguments):
        log.warning("%s: bad arguments: %s", function, exc)
        return CKR_ARGUMENTS_BAD
    if isinstance(exc, Refused):
        log.warning("%s: refused: %s", function, exc)
        return exc.rv
    if isinstance(exc, TooLarge):
        log.warning("%s: %s", function, exc)
        return CKR_HOST_MEMORY
    lines = traceback.format_exception(exc)
    if secret:  # the frames only: the last line holds the message
        lines = lines[:-1] + [f"{type(exc).__name__} (message withheld: the call holds a PIN)"]
    text = " | ".join(line.rstrip().replace("\n", " | ") for line in lines)
    log.error("%s: internal error, answered CKR_FUNCTION_FAILED: %s", function, text)
    return CKR_FUNCTION_FAILED


def describe_rv(rv: int) -> str:
    return rv_name(rv)


def setup_logging(module_path: str) -> None:
    """One line per event on stderr, with the helper's pid and module."""
    level = os.environ.get("P11P_HELPER_LOG", "WARNING").upper()
    handler = logging.StreamHandler(sys.stderr)
    name = os.path.basename(module_path) or "?"
    handler.setFormatter(logging.Formatter(
        f"p11p-helper[%(process)d] module={name} %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level if level in logging.getLevelNamesMapping() else "WARNING")
    log.propagate = False
