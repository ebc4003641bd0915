"""A real application for lifecycle tests: PyKCS11 on a module, driven by the test.

Each line on stdin is a JSON string of Python statements, run in one namespace that
holds `lib` (the loaded PyKCS11Lib), `P` (the PyKCS11 module), `R` (the same module
through tests/ckraw.py) and whatever earlier
statements left there. The answer is one JSON line: {"value": repr of `_`} when the
statements ran, {"rv": CK_RV} when PyKCS11 raised a Cryptoki error, {"error": text}
otherwise. Only the test that started this process writes to its stdin.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import PyKCS11

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ckraw  # noqa: E402


def main() -> None:
    lib = PyKCS11.PyKCS11Lib()
    lib.load(sys.argv[1])
    # the same module through ctypes, for calls PyKCS11 lacks (C_CopyObject,
    # C_DigestKey, ...): `H(session)` is a PyKCS11 session's handle number
    ns: dict[str, Any] = {"lib": lib, "P": PyKCS11, "R": ckraw.Module(sys.argv[1]),
                          "ckraw": ckraw, "H": lambda s: int(s.session.value())}
    print(json.dumps({"value": "started"}), flush=True)
    for line in sys.stdin:
        ns["_"] = None
        try:
            exec(json.loads(line), ns)  # noqa: S102 - the test's own statements
            out: dict[str, Any] = {"value": repr(ns["_"])}
        except PyKCS11.PyKCS11Error as exc:
            out = {"rv": int(exc.value)}
        except Exception:  # noqa: BLE001 - reported to the test as text
            out = {"error": traceback.format_exc()}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
