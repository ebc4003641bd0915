# p11p helper (included by the top Makefile): the cffi extension helper/_cryptoki*.so,
# compiled against the system's Cryptoki headers; `make build` depends on helper-cffi.
# The helper builds it into a cache itself when it is missing or stale (helper/ffi.py).
HELPER_EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
HELPER_CFFI := helper/_cryptoki$(HELPER_EXT_SUFFIX)
HELPER_CFFI_INPUTS := helper/build_cffi.py helper/cryptoki.cdef protocol/functions.spec \
                      protocol/spec.py protocol/p11p-extra.h helper/fast.c \
                      protocol/mechanisms.spec

.PHONY: helper-cffi
helper-cffi: $(HELPER_CFFI)

$(HELPER_CFFI): $(HELPER_CFFI_INPUTS)
	$(PYTHON) helper/build_cffi.py helper
