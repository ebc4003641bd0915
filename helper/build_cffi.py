"""Builds the helper's cffi extension (API mode) against the system's Cryptoki headers.

Declarations come from cryptoki.cdef; one C call shim per function of
protocol/functions.spec is generated here (it calls the vendor module through its
CK_FUNCTION_LIST, so the compiler checks every argument against the real prototype).
The data plane (fast.c) comes with its codec: fast_codec.c, fast_template.c and the
calls generated from the specs into gen/fast_calls.c (gen_fast.py), compiled as sources
of their own and linked with msgpack-c.
The fork server's request loop (fork_loop.c) is compiled in too: the fork server loads
this extension (for the call table it makes for its helpers) before any module.
The result is `_cryptoki<EXT_SUFFIX>`: beside this file at `make helper-cffi` time, or in
a cache directory when the helper finds it missing or stale (see ffi.py). The build is
keyed by a hash of everything that goes into it; the key is compiled in, so a stale
module is recognised.

Run as a script: `python3 helper/build_cffi.py [--sanitize] [DEST_DIR]` (default: this
directory).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
MODULE_NAME = "_cryptoki"
P11KIT_INCLUDE = Path("/usr/include/p11-kit-1")
COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Werror"]
# The sanitized twin the tests run the helper's data plane on (ffi.py, P11P_HELPER_SANITIZE):
# the process that loads it must have libasan preloaded (LD_PRELOAD).
SANITIZE_ARGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                 "-fno-omit-frame-pointer", "-g"]
# The data plane's codec: compiled beside the generated source, each on its own.
CODEC_SOURCES = (HERE / "fast_codec.c", HERE / "fast_template.c", HERE / "gen" / "fast_calls.c")
CODEC_HEADERS = (HERE / "fast_codec.h",)
# The data plane's connections (fast.c, compiled into the generated source, holds the
# state they share with it: fast.h).
PLANE_SOURCES = (HERE / "fast_conn.c",)
PLANE_HEADERS = (HERE / "fast.h",)
# Functions the helper never forwards: it initialises the module itself and holds its
# function list.
NOT_FORWARDED = frozenset({"C_Initialize", "C_GetFunctionList"})

# How each argument kind reaches the shim: its C parameter types (NULL for kinds that
# never travel). Pointers are void * so one shim shape serves every pointer type.
_PARAM_TYPES = {
    "ulong": ["CK_ULONG"], "slot": ["CK_ULONG"], "session": ["CK_ULONG"],
    "object": ["CK_ULONG"], "bbool": ["CK_BBOOL"],
    "bytes": ["void *", "CK_ULONG"], "pin": ["void *", "CK_ULONG"], "label32": ["void *"],
    "template": ["void *", "CK_ULONG"], "template_get": ["void *", "CK_ULONG"],
    "mechanism": ["void *"],
    "out_bytes": ["void *", "CK_ULONG *"], "out_random": ["void *", "CK_ULONG"],
    "out_ulong": ["void *"], "out_slot": ["void *"], "out_session": ["void *"],
    "out_object": ["void *"],
    "out_slots": ["void *", "CK_ULONG *"], "out_mechs": ["void *", "CK_ULONG *"],
    "out_objects": ["void *", "CK_ULONG", "CK_ULONG *"],
    "out_info": ["void *"], "out_slot_info": ["void *"], "out_token_info": ["void *"],
    "out_mech_info": ["void *"], "out_session_info": ["void *"],
}
_SILENT_ARGS = {"notify": ["NULL", "NULL"], "reserved": ["NULL"]}

# The data plane (fast.c): served in C threads of their own.
FAST_CDEF = """
/* data plane (fast.c) */
int p11p_fast_start(const char *name, size_t name_len, const unsigned char *token,
                    unsigned int uid);
unsigned long long p11p_fast_allow(unsigned long real);
void p11p_fast_revoke(unsigned long long id);
void p11p_fast_stop(int grace_ms);
unsigned long long p11p_fast_served(void);
unsigned long long p11p_fast_stuck(void);
void p11p_fast_limit(unsigned long max_output);
int p11p_structured_mechanism(unsigned long type);
"""

# The fork server's request loop (fork_loop.c): run in the fork server, never in a helper.
FORK_CDEF = """
/* fork server (fork_loop.c) */
enum p11p_fork_event {
    P11P_FORK_CHILD = 1, P11P_FORK_SIGTERM = 2, P11P_FORK_EOF = 3, P11P_FORK_MALFORMED = 4,
    P11P_FORK_FAILED = 5, P11P_FORK_ERROR = 6
};
struct p11p_fork_request {
    long long number;
    const char *module;
    size_t module_len;
    int in_fd, out_fd;
    int error;
};
int p11p_fork_serve(int link, int wake, struct p11p_fork_request *request);
int p11p_fork_reap(int link);
int p11p_fork_children(void);
int p11p_fork_signals(void);
size_t p11p_fork_fill_heap(void);
"""

LOADER = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <p11-kit/pkcs11.h>
#include "p11p-extra.h"

static CK_FUNCTION_LIST_PTR p11p_module;

/* dlopen()s the vendor module and takes its function list; 0, or -1 with a message. */
int p11p_load(const char *path, char *error, size_t error_len)
{
	CK_C_GetFunctionList get_function_list;
	CK_FUNCTION_LIST_PTR list = NULL;
	CK_RV rv;
	void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);

	if (handle == NULL) {
		snprintf(error, error_len, "dlopen: %s", dlerror());
		return -1;
	}
	get_function_list = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
	if (get_function_list == NULL) {
		snprintf(error, error_len, "no C_GetFunctionList in %s", path);
		return -1;
	}
	rv = get_function_list(&list);
	if (rv != CKR_OK || list == NULL) {
		snprintf(error, error_len, "C_GetFunctionList returned 0x%lx", (unsigned long)rv);
		return -1;
	}
	p11p_module = list;
	return 0;
}

/* C_Initialize with the operating system's locking: the helper calls from many threads. */
CK_RV p11p_initialize(void)
{
	CK_C_INITIALIZE_ARGS args;

	memset(&args, 0, sizeof(args));
	args.flags = CKF_OS_LOCKING_OK;
	return p11p_module->C_Initialize(&args);
}
"""


def load_spec() -> ModuleType:
    """protocol/spec.py: the installed package, else the file beside this one (a build
    may run before the package is installed)."""
    try:
        from p11p.protocol import spec
        return spec
    except ImportError:
        path = HERE.parent / "protocol" / "spec.py"
        module_spec = importlib.util.spec_from_file_location("_p11p_protocol_spec", path)
        if module_spec is None or module_spec.loader is None:
            raise
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module  # dataclasses look their module up
        module_spec.loader.exec_module(module)
        return module


def shim_name(function_name: str) -> str:
    return f"p11p_{function_name}"


def _shim(fn: object) -> tuple[str, str]:
    """(cdef prototype, C definition) of the shim of one function."""
    params: list[str] = []
    call: list[str] = []
    for arg in fn.args:  # type: ignore[attr-defined]
        if arg.kind in _SILENT_ARGS:
            call += _SILENT_ARGS[arg.kind]
            continue
        for ctype in _PARAM_TYPES[arg.kind]:
            name = f"a{len(params)}"
            params.append(f"{ctype} {name}" if not ctype.endswith("*") else f"{ctype}{name}")
            call.append(name)
    name = fn.name  # type: ignore[attr-defined]
    proto = f"CK_RV {shim_name(name)}({', '.join(params) or 'void'})"
    return proto + ";", f"{proto}\n{{\n\treturn p11p_module->{name}({', '.join(call)});\n}}\n"


def sources() -> tuple[str, str, str]:
    """(cdef, C source, build key) of the extension."""
    spec = load_spec()
    shims = [_shim(f) for f in spec.functions() if f.name not in NOT_FORWARDED]
    cdef = (HERE / "cryptoki.cdef").read_text() + "\n/* call shims */\n" + "\n".join(
        p for p, _ in shims) + "\n" + FAST_CDEF + FORK_CDEF
    source = LOADER + "\n" + "\n".join(body for _, body in shims) + "\n" + (
        HERE / "fast.c").read_text() + "\n" + (HERE / "fork_loop.c").read_text()
    digest = hashlib.sha256()
    for part in (cdef, source, " ".join(COMPILE_ARGS), str(sysconfig.get_config_var("EXT_SUFFIX")),
                 (P11KIT_INCLUDE / "p11-kit" / "pkcs11.h").read_text(),
                 (Path(spec.HERE) / "p11p-extra.h").read_text(),
                 (Path(spec.HERE) / "p11p-prescan.h").read_text(),
                 *(path.read_text() for path in (*CODEC_SOURCES, *CODEC_HEADERS,
                                                 *PLANE_SOURCES, *PLANE_HEADERS))):
        digest.update(part.encode())
        digest.update(b"\0")
    key = digest.hexdigest()[:20]
    source += f'\nconst char *p11p_build_key(void)\n{{\n\treturn "{key}";\n}}\n'
    return cdef, source, key


def extension_filename() -> str:
    return MODULE_NAME + str(sysconfig.get_config_var("EXT_SUFFIX"))


def build(dest_dir: Path, verbose: bool = False, sanitize: bool = False) -> Path:
    """Compiles the extension into dest_dir (atomically); returns its path. `sanitize`:
    under AddressSanitizer and UndefinedBehaviorSanitizer (SANITIZE_ARGS)."""
    from cffi import FFI

    cdef, source, _key = sources()
    spec = load_spec()
    builder = FFI()
    builder.cdef(cdef)
    builder.set_source(MODULE_NAME, source,
                       sources=[str(p) for p in (*CODEC_SOURCES, *PLANE_SOURCES)],
                       include_dirs=[str(P11KIT_INCLUDE), str(spec.HERE), str(HERE)],
                       libraries=["dl", "msgpackc"],
                       extra_compile_args=COMPILE_ARGS + (SANITIZE_ARGS if sanitize else []),
                       extra_link_args=SANITIZE_ARGS[:1] if sanitize else [])
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / extension_filename()
    with tempfile.TemporaryDirectory(prefix=".cffi-build-", dir=dest_dir) as tmp:
        built = Path(builder.compile(tmpdir=tmp, verbose=verbose))
        os.replace(built, target)  # a helper starting meanwhile never sees half a file
    return target


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a not in ("-v", "--sanitize")]
    print(build(Path(args[0]) if args else HERE, verbose="-v" in sys.argv,
                sanitize="--sanitize" in sys.argv))
