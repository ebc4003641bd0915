"""How the helper gets its compiled extension and keeps its pipes: the build key, the
fallback build into the cache, and a vendor module that prints to stdout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helperfixtures import *  # noqa: F403  (the fixtures)
from helperlink import SOFTHSM_SO, HelperLink, SoftHSMDir
from p11p.helper import build_cffi

FALLBACK = """
import sys
from p11p.helper import build_cffi
build_cffi.extension_filename = lambda: "_cryptoki_test_fallback.so"  # none is found
from p11p.helper.ffi import ffi, lib
print(ffi.string(lib.p11p_build_key()).decode())
"""


def test_missing_extension_is_built_into_the_cache(tmp_path: Path) -> None:
    env = {**os.environ, "P11P_CACHE_DIR": str(tmp_path), "P11P_HELPER_LOG": "INFO"}
    done = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    key = build_cffi.sources()[2]
    assert done.stdout.strip() == key
    assert (tmp_path / f"helper-{key}" / "_cryptoki_test_fallback.so").exists()
    assert "building it into" in done.stderr
    assert not list((tmp_path / f"helper-{key}").glob(".cffi-build-*"))  # no leftovers


def test_build_key_follows_the_sources() -> None:
    cdef, source, key = build_cffi.sources()
    assert f'return "{key}";' in source
    assert "CK_RV p11p_C_Sign(CK_ULONG a0, void *a1, CK_ULONG a2, void *a3, CK_ULONG *a4);" in cdef
    assert "p11p_C_Initialize" not in cdef and "p11p_C_GetFunctionList" not in cdef


def test_the_direct_paths_generated_calls_are_current() -> None:
    """helper/gen/fast_calls.c is what helper/gen_fast.py makes from the specs now."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "helper" / "gen_fast.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


CHATTY_MODULE = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>
#include <p11-kit/pkcs11.h>

/* a vendor module that writes to stdout when loaded and on every C_GetFunctionList */
__attribute__((constructor)) static void chatter(void)
{
	printf("vendor banner\n");
	fflush(stdout);
	write(1, "\x00\x00\x00\x05junk", 9);
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	void *real = dlopen("SOFTHSM", RTLD_NOW | RTLD_LOCAL);
	CK_C_GetFunctionList get = real ? (CK_C_GetFunctionList)dlsym(real, "C_GetFunctionList") : NULL;

	printf("C_GetFunctionList called\n");
	fflush(stdout);
	return get ? get(list) : CKR_GENERAL_ERROR;
}
"""


def test_a_module_that_prints_cannot_break_frames(tmp_path: Path, hsm: SoftHSMDir) -> None:
    source = tmp_path / "chatty.c"
    source.write_text(textwrap.dedent(CHATTY_MODULE).replace("SOFTHSM", SOFTHSM_SO))
    module = tmp_path / "chatty.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-I/usr/include/p11-kit-1", "-o", str(module),
                    str(source), "-ldl"], check=True, capture_output=True)
    link = HelperLink(str(module), hsm.env)
    try:
        assert link.ready == [0, 0, link.pid, ["cpu_hint", "pairs", "mailbox"]]
        assert link.call(-1) == [0, link.pid]
        assert link.token_slot() > 0
    finally:
        link.stop()
    assert any("vendor banner" in line for line in link.stderr_lines)
