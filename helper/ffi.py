"""The helper's cffi module: built once (API mode, against the system's Cryptoki
headers), cached, loaded by the helper.

The call shims (one C function per Cryptoki function, calling through the loaded
module's CK_FUNCTION_LIST) are generated here from protocol/functions.spec; structure
declarations are in cryptoki.cdef. The build is keyed by a hash of everything that goes
into it, so a changed spec or header rebuilds it.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from p11p.protocol import spec

HERE = Path(__file__).resolve().parent
INCLUDE_DIRS = ["/usr/include/p11-kit-1", str(spec.HERE)]
_SCALAR = {"ulong": "unsigned long", "slot": "unsigned long", "session": "unsigned long",
           "object": "unsigned long", "bbool": "unsigned char"}
# kind -> (C parameter types for the shim, how the real function gets them)
_POINTERS = {
    "bytes": ["void *", "unsigned long"], "pin": ["void *", "unsigned long"],
    "label32": ["void *"], "template": ["void *", "unsigned long"],
    "template_get": ["void *", "unsigned long"], "mechanism": ["void *"],
    "out_bytes": ["void *", "unsigned long *"], "out_random": ["void *", "unsigned long"],
    "out_ulong": ["void *"], "out_slot": ["void *"], "out_session": ["void *"],
    "out_object": ["void *"], "out_slots": ["void *", "unsigned long *"],
    "out_mechs": ["void *", "unsigned long *"],
    "out_objects": ["void *", "unsigned long", "unsigned long *"],
    "out_info": ["void *"], "out_slot_info": ["void *"], "out_token_info": ["void *"],
    "out_mech_info": ["void *"], "out_session_info": ["void *"],
}


def shim_functions() -> list[spec.Function]:
    """The functions the helper calls (all but C_Initialize and C_GetFunctionList)."""
    return [f for f in spec.functions() if f.name not in ("C_Initialize", "C_GetFunctionList")]


def _shim(fn: spec.Function) -> tuple[str, str]:
    params: list[str] = []
    call: list[str] = []
    for arg in fn.args:
        if arg.kind == "notify":
            call += ["NULL", "NULL"]
        elif arg.kind == "reserved":
            call.append("NULL")
        else:
            types = [_SCALAR[arg.kind]] if arg.kind in _SCALAR else _POINTERS[arg.kind]
            for t in types:
                name = f"a{len(params)}"
                params.append(f"{t} {name}")
                call.append(name)
    proto = f"CK_RV p11p_{fn.name}({', '.join(params) or 'void'})"
    body = f"{proto} {{ return p11p_module->{fn.name}({', '.join(call)}); }}"
    return proto + ";", body


LOADER = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <p11-kit/pkcs11.h>
#include "p11p-extra.h"

static CK_FUNCTION_LIST_PTR p11p_module;

int p11p_load(const char *path, char *error, size_t error_len)
{
	CK_C_GetFunctionList get;
	void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);

	if (handle == NULL) {
		snprintf(error, error_len, "%s", dlerror());
		return -1;
	}
	get = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
	if (get == NULL) {
		snprintf(error, error_len, "no C_GetFunctionList in %s", path);
		return -1;
	}
	if (get(&p11p_module) != CKR_OK || p11p_module == NULL) {
		snprintf(error, error_len, "C_GetFunctionList failed in %s", path);
		return -1;
	}
	return 0;
}

CK_RV p11p_initialize(void)
{
	CK_C_INITIALIZE_ARGS args;

	memset(&args, 0, sizeof(args));
	args.flags = CKF_OS_LOCKING_OK;
	return p11p_module->C_Initialize(&args);
}
"""


def sources() -> tuple[str, str]:
    """(cdef, C source) of the module."""
    shims = [_shim(f) for f in shim_functions()]
    cdef = (HERE / "cryptoki.cdef").read_text() + "\n" + "\n".join(p for p, _ in shims)
    source = LOADER + "\n" + "\n".join(b for _, b in shims) + "\n"
    return cdef, source


def _key(cdef: str, source: str) -> str:
    h = hashlib.sha256()
    for part in (cdef, source, sys.version, (Path(INCLUDE_DIRS[0]) / "p11-kit" / "pkcs11.h").read_text(),
                 (spec.HERE / "p11p-extra.h").read_text()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("P11P_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "p11p")
    return Path(base)


def build(verbose: bool = False) -> Path:
    """Compiles the module into the cache (if not there yet); returns its path."""
    from cffi import FFI

    cdef, source = sources()
    target_dir = cache_dir() / f"cffi-{_key(cdef, source)}"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = target_dir / f"_p11p_cryptoki{suffix}"
    if target.exists():
        return target
    builder = FFI()
    builder.cdef(cdef)
    builder.set_source("_p11p_cryptoki", source, include_dirs=INCLUDE_DIRS, libraries=["dl"],
                       extra_compile_args=["-O2", "-Wall", "-Werror"])
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        built = Path(builder.compile(tmpdir=tmp, verbose=verbose))
        os.replace(built, target)  # atomic: concurrent helpers never see half a file
    return target


def load() -> tuple[Any, Any]:
    """(ffi, lib), building first if needed."""
    path = build()
    loader = importlib.machinery.ExtensionFileLoader("_p11p_cryptoki", str(path))
    module_spec = importlib.util.spec_from_file_location("_p11p_cryptoki", path, loader=loader)
    assert module_spec is not None
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    return module.ffi, module.lib


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
