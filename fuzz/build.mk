# p11p fuzzing (included by the top Makefile; not part of `make test`).
#   make fuzz                    every fuzzer for FUZZ_SECONDS (default 60) each
#   make fuzz FUZZ_SECONDS=600   longer
#   make fuzz FUZZ_ONLY=client   one or some of: client, helper, decoder, dispatch
# Installs what is missing first: clang with libFuzzer (Debian), atheris (pip).
# Exits non-zero when a fuzzer finds a crash; its input is left in build/fuzz/crashes/.
FUZZ_SECONDS ?= 60
FUZZ_ONLY ?= client,helper,decoder,dispatch
FUZZ_BUILD := $(BUILD)/fuzz
FUZZ_CC ?= clang
FUZZ_CLIENT_SRCS := client/codec.c client/codec_info.c client/codec_template.c \
                    client/codec_mech.c client/call.c client/find.c client/lock.c \
                    client/transport.c client/hello.c client/kept.c client/debug.c client/box.c \
                    client/gen/stubs.c client/gen/mech_params.c
FUZZ_HELPER_SRCS := helper/fast_codec.c helper/fast_template.c helper/gen/fast_calls.c
FUZZ_CFLAGS := -std=c11 -D_GNU_SOURCE -g -O1 -Wall -Wextra -Werror -pthread $(P11_CFLAGS) \
               -Iclient -Ifuzz -I$(FUZZ_BUILD) \
               -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
               -fno-omit-frame-pointer

.PHONY: fuzz fuzz-deps

fuzz: build fuzz-deps $(FUZZ_BUILD)/client_reply_fuzzer $(FUZZ_BUILD)/helper_request_fuzzer
	$(PYTHON) fuzz/run.py --seconds $(FUZZ_SECONDS) --only $(FUZZ_ONLY) --build $(FUZZ_BUILD)

# clang is there and links libFuzzer (the runtime is a package of its own); atheris imports.
fuzz-deps:
	@mkdir -p $(FUZZ_BUILD)
	@printf 'int LLVMFuzzerTestOneInput(const char *d, long n) { (void)d; (void)n; return 0; }\n' \
	  > $(FUZZ_BUILD)/probe.c
	@$(FUZZ_CC) -fsanitize=fuzzer,address -o $(FUZZ_BUILD)/probe $(FUZZ_BUILD)/probe.c 2>/dev/null || \
	  { echo "installing clang and libFuzzer"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-dev >/dev/null; }
	@$(PYTHON) -c "import atheris" 2>/dev/null || \
	  { echo "installing atheris"; $(PYTHON) -m pip install -q --root-user-action=ignore atheris; }

$(FUZZ_BUILD)/client_calls.c: fuzz/gen_client_calls.py protocol/functions.spec
	@mkdir -p $(FUZZ_BUILD)
	$(PYTHON) fuzz/gen_client_calls.py $@

$(FUZZ_BUILD)/client_reply_fuzzer: fuzz/client_reply_fuzzer.c fuzz/client_fuzz.h \
		$(FUZZ_BUILD)/client_calls.c $(FUZZ_CLIENT_SRCS) $(CLIENT_HDRS) | fuzz-deps
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ fuzz/client_reply_fuzzer.c $(FUZZ_BUILD)/client_calls.c \
	  $(FUZZ_CLIENT_SRCS) -lmsgpackc

# The helper's direct-path codec (FUZZ_HELPER_SRCS: the sources of helper/build_cffi.py's
# CODEC_SOURCES) against a fake module: every request a client may send on the helper's socket.
$(FUZZ_BUILD)/helper_request_fuzzer: fuzz/helper_request_fuzzer.c $(FUZZ_HELPER_SRCS) \
		helper/fast_codec.h protocol/p11p-prescan.h protocol/p11p-extra.h | fuzz-deps
	$(FUZZ_CC) $(FUZZ_CFLAGS) -Ihelper -o $@ fuzz/helper_request_fuzzer.c $(FUZZ_HELPER_SRCS) \
	  -lmsgpackc
