# p11p-faultsim.so: the fault-injecting PKCS#11 module (faultsim/README.md).
FAULTSIM_SRC := faultsim/faultsim.c faultsim/rules.c faultsim/gen/passthrough.c

$(BUILD)/p11p-faultsim.so: $(FAULTSIM_SRC) faultsim/faultsim.h
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS_COMMON) $(CFLAGS) -fvisibility=hidden -Ifaultsim -shared -o $@ $(FAULTSIM_SRC) -ldl -pthread

$(BUILD)/asan/p11p-faultsim.so: $(FAULTSIM_SRC) faultsim/faultsim.h
	@mkdir -p $(BUILD)/asan
	$(CC) $(CFLAGS_COMMON) -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fvisibility=hidden -Ifaultsim -shared -o $@ $(FAULTSIM_SRC) -ldl -pthread
