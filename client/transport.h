/* p11p client — the transport: an AF_UNIX stream socket to the daemon, the hello, and
 * frames (4-byte big-endian length + one msgpack object) with deadlines. Knows nothing
 * of Cryptoki calls; the pool (pool.c) decides which connection carries what. */
#ifndef P11P_TRANSPORT_H
#define P11P_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#include "p11p-extra.h"

#define P11P_CTX_SIZE 16

/* What a hello agreed on (protocol/README.md "Client link: hello"), or why it failed. */
struct p11p_welcome {
	unsigned version;  /* the version the connection speaks */
	unsigned features; /* P11P_FEATURE_* bits (client/gen/versions.h) both sides know */
	unsigned long max_sessions; /* with client_open: the daemon's sessions per application */
	unsigned long hold_ms;   /* with restart: how long a call waits for a restarted daemon */
	int has_key;             /* with resume: the state file's key (client/kept.h) */
	unsigned char key[32];
	char why[192];     /* on failure, for the notice: empty when the socket failed */
};

/* Milliseconds on the monotonic clock. Deadlines are absolute; -1 means none. */
int64_t p11p_now_ms(void);
int64_t p11p_deadline(int timeout_ms);
/* Nanoseconds on the same clock (a call's awake wait). */
int64_t p11p_now_ns(void);
/* Waits for `events` on fd until the deadline: 0 when ready (or in error: the next send
 * or recv says which), -1 when the deadline passed. */
int p11p_wait_fd(int fd, short events, int64_t deadline);

/* A new non-blocking, close-on-exec AF_UNIX stream socket, or -1. */
int p11p_socket_new(void);
/* CKR_OK, or on failure (errno says why) P11P_RV_NO_DAEMON when nobody serves the path,
 * else CKR_DEVICE_ERROR. */
CK_RV p11p_socket_connect(int fd, const char *path, int64_t deadline);
/* Offers the versions and features this library speaks and reads the daemon's choice;
 * CKR_DEVICE_ERROR when it refuses or answers a version outside them. */
CK_RV p11p_hello(int fd, const unsigned char ctx[P11P_CTX_SIZE], int64_t deadline,
		 struct p11p_welcome *welcome);
/* Sends a frame whose first 4 bytes are left for the header (filled here). */
CK_RV p11p_send_frame(int fd, char *frame, size_t len, int64_t deadline);
/* The same with a CPU hint for a helper that follows it (data plane): the header's first
 * byte is `cpu` + 1 (0 for a cpu < 0: no hint), the length takes the other three. */
CK_RV p11p_send_hinted(int fd, char *frame, size_t len, int64_t deadline, int cpu);
/* Only the header of p11p_send_hinted (a mailbox's request: client/box.c): 0, or -1
 * when the frame is too large for it. */
int p11p_put_hinted(char *frame, size_t len, int cpu);
/* Two requests in one send, each as p11p_send_hinted: a data-plane pair (an operation's
 * init and its next call) to a helper that answers pairs. */
CK_RV p11p_send_pair(int fd, char *a, size_t alen, char *b, size_t blen, int64_t deadline,
		     int cpu);
/* A pair's two replies (malloc'd bodies; at most P11P_MAX_REPLY bytes each), mostly taken
 * by one recv; bytes past the second are a broken peer. */
CK_RV p11p_recv_two(int fd, char **a, size_t *alen, char **b, size_t *blen, int64_t deadline);
/* Receives one frame body (malloc'd) of at most P11P_MAX_REPLY bytes. */
CK_RV p11p_recv_frame(int fd, char **body, size_t *len, int64_t deadline);
/* The same, where bytes that came past the frame may be the start of `may_follow` (the
 * daemon's last answer on a connection it closes): *followed tells they did. */
CK_RV p11p_recv_then(int fd, char **body, size_t *len, int64_t deadline,
		     const unsigned char *may_follow, size_t follow_len, int *followed);
/* An idle connection still usable: nothing to read and no hang-up. */
int p11p_socket_idle_ok(int fd);

#endif
