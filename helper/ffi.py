"""The compiled Cryptoki extension (see build_cffi.py): found, checked, loaded.

Importing this module loads it and exposes `ffi` and `lib`. It looks beside the helper's
sources (where `make helper-cffi` puts it) and in the cache; a module whose compiled-in
build key differs from what the current sources and headers would give is stale and is
passed over. When none fits, it is built into the cache now (one log line), so a helper
started from a fresh checkout still runs.

With P11P_HELPER_SANITIZE=1 in its environment the helper loads the extension's twin built
under AddressSanitizer and UndefinedBehaviorSanitizer instead (from the cache, built there
when missing): the tests run the data plane's C on it. That process must have libasan
preloaded (LD_PRELOAD); nothing else looks at the variable.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from p11p.helper import build_cffi
from p11p.helper.errors import log

MODULE = "p11p.helper._cryptoki"
SANITIZE_ENV = "P11P_HELPER_SANITIZE"


def cache_dir() -> Path:
    base = os.environ.get("P11P_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "p11p")
    return Path(base)


def expected_key() -> str | None:
    """The build key of the current sources; None when it cannot be worked out (no
    Cryptoki headers on this machine): then any compiled module found is used."""
    try:
        return build_cffi.sources()[2]
    except OSError:
        return None


def _load_file(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _key_of(module: ModuleType) -> str:
    key: str = module.ffi.string(module.lib.p11p_build_key()).decode()
    return key


def sanitized_dir(key: str) -> Path:
    """Where the sanitized twin of the extension of build key `key` is kept."""
    return cache_dir() / f"helper-{key}-sanitized"


def load() -> tuple[Any, Any]:
    """(ffi, lib) of a compiled module that matches the sources, building one if needed
    (the sanitized twin only, with P11P_HELPER_SANITIZE=1)."""
    key = expected_key()
    name = build_cffi.extension_filename()
    sanitize = os.environ.get(SANITIZE_ENV) == "1"
    here = Path(__file__)
    places = [] if sanitize else [here.parent, here.resolve().parent]  # installed; editable
    if key is not None:
        places.append(sanitized_dir(key) if sanitize else cache_dir() / f"helper-{key}")
    seen: set[Path] = set()
    for place in places:
        path = place / name
        if path in seen or not path.exists():
            continue
        seen.add(path)
        module = _load_file(path)
        if key is None or _key_of(module) == key:
            return module.ffi, module.lib
        log.info("compiled module %s is stale; passed over", path)
    if key is None:
        raise RuntimeError(f"no compiled module {name} and no Cryptoki headers to build one")
    target = places[-1]
    log.warning("compiled module missing or stale; building it into %s", target)
    module = _load_file(build_cffi.build(target, sanitize=sanitize))
    return module.ffi, module.lib


ffi, lib = load()
