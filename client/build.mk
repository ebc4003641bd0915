# p11p client library (included by the top Makefile): $(BUILD)/p11p-client.so and its
# ASan/UBSan twin $(BUILD)/asan/p11p-client.so for the tests. Only the C_* functions are
# exported (-fvisibility=hidden, P11P_EXPORT on the Cryptoki entry points).
CLIENT_SRCS := $(sort $(wildcard client/*.c) $(wildcard client/gen/*.c))
CLIENT_HDRS := $(wildcard client/*.h client/gen/*.h protocol/*.h)
CLIENT_OBJS := $(CLIENT_SRCS:%.c=$(BUILD)/obj/%.o)
CLIENT_ASAN_OBJS := $(CLIENT_SRCS:%.c=$(BUILD)/asan/obj/%.o)
CLIENT_CFLAGS = $(CFLAGS_COMMON) $(CFLAGS) -fvisibility=hidden
CLIENT_SANITIZE := -fsanitize=address,undefined -fno-omit-frame-pointer
CLIENT_LIBS := -lmsgpackc -pthread

.PHONY: client client-asan
client: $(BUILD)/p11p-client.so
client-asan: $(BUILD)/asan/p11p-client.so

$(BUILD)/p11p-client.so: $(CLIENT_OBJS)
	$(CC) -shared -fvisibility=hidden -Wl,--no-undefined -o $@ $^ $(CLIENT_LIBS)

$(BUILD)/asan/p11p-client.so: $(CLIENT_ASAN_OBJS)
	$(CC) -shared -fvisibility=hidden $(CLIENT_SANITIZE) -o $@ $^ $(CLIENT_LIBS)

$(BUILD)/obj/client/%.o: client/%.c $(CLIENT_HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CLIENT_CFLAGS) -c -o $@ $<

$(BUILD)/asan/obj/client/%.o: client/%.c $(CLIENT_HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CLIENT_CFLAGS) $(CLIENT_SANITIZE) -c -o $@ $<
