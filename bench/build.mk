# p11bench, the benchmark client (bench/README.md); included by the top Makefile.
BENCH_SRCS := $(wildcard bench/*.c)
BENCH_HDRS := $(wildcard bench/*.h)

$(BUILD)/p11bench: $(BENCH_SRCS) $(BENCH_HDRS)
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS_COMMON) $(CFLAGS) -o $@ $(BENCH_SRCS) -ldl -pthread
