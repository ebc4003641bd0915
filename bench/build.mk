# p11bench, the benchmark client (bench/README.md); included by the top Makefile.
BENCH_SRCS := $(wildcard bench/*.c)
BENCH_HDRS := $(wildcard bench/*.h)

$(BUILD)/p11bench: $(BENCH_SRCS) $(BENCH_HDRS)
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS_COMMON) $(CFLAGS) -o $@ $(BENCH_SRCS) -ldl -pthread

# ipc-floor: what a round trip between two processes costs here, apart from p11p
# (bench/README.md, "The IPC floor")
$(BUILD)/ipc-floor: bench/ipc/ipc_floor.c
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS_COMMON) $(CFLAGS) -o $@ $< -pthread -ldl
