# p11p helper (included by the top Makefile): the cffi extension helper/_cryptoki*.so,
# compiled against the system's Cryptoki headers; `make build` depends on helper-cffi.
# The helper builds it into a cache itself when it is missing or stale (helper/ffi.py).
# The data plane's calls (helper/gen/fast_calls.c) are generated from the specs by
# helper/gen_fast.py and committed, like client/gen/; a change of the specs remakes them.
HELPER_EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
HELPER_CFFI := helper/_cryptoki$(HELPER_EXT_SUFFIX)
HELPER_GEN := helper/gen/fast_calls.c
HELPER_CFFI_INPUTS := helper/build_cffi.py helper/cryptoki.cdef protocol/functions.spec \
                      protocol/spec.py protocol/p11p-extra.h protocol/p11p-prescan.h \
                      helper/fast.c helper/fork_loop.c helper/fast_codec.c helper/fast_template.c \
                      helper/fast_codec.h helper/fast_conn.c helper/fast.h \
                      $(HELPER_GEN) protocol/mechanisms.spec

.PHONY: helper-cffi helper-gen
helper-cffi: $(HELPER_CFFI)
helper-gen: $(HELPER_GEN)

$(HELPER_GEN): helper/gen_fast.py protocol/functions.spec protocol/mechanisms.spec protocol/spec.py
	$(PYTHON) helper/gen_fast.py
	@touch $@

$(HELPER_CFFI): $(HELPER_CFFI_INPUTS)
	$(PYTHON) helper/build_cffi.py helper
