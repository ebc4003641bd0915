/* p11p helper — the data plane's state (internal to fast.c and fast_conn.c): the table
 * of bound sessions and the calls inside the module (fast.c), the listener's name,
 * token and uid, and its connections (fast_conn.c), all under one lock. */
#ifndef P11P_FAST_H
#define P11P_FAST_H

#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>

#include "fast_codec.h"

struct p11p_box;

#define FAST_TOKEN 16
#define FAST_IDS 4096                    /* bound sessions at once, per helper */
#define FAST_MAX_CONNS 64                /* connections at once: calls in flight, at most */

struct p11p_fast_state {
	pthread_mutex_t lock;
	pthread_cond_t idle;
	int listening, stopping;
	unsigned long busy;              /* calls inside the module */
	unsigned long long served;       /* calls answered by the module, ever */
	unsigned conns;                  /* connections open */
	uint64_t since[FAST_MAX_CONNS];  /* when each call inside the module entered (ms), 0: free */
	uid_t uid;
	unsigned char token[FAST_TOKEN];
	char name[108];
	size_t name_len;
	uint64_t epoch;                  /* bumped when the helper passes to another application */
	int fds[FAST_MAX_CONNS];         /* the connections' sockets, + 1 (0: free) */
	struct p11p_box *boxes[FAST_MAX_CONNS];  /* their mailboxes (fast_conn.c), or NULL */
	uint64_t generation;
	/* bound sessions: calls inside the module on each; a revoked one takes no new call
	 * and is freed once its calls are out (the daemon closes its session next) */
	struct { uint64_t id; CK_SESSION_HANDLE real; unsigned inside; int revoked; } ids[FAST_IDS];
};

extern struct p11p_fast_state p11p_fast;
/* The application epoch of the connection this thread serves (fast_conn.c's hello):
 * a call of a connection of an application served before is refused (fast.c, enter). */
extern __thread uint64_t p11p_fast_conn_epoch;
/* The calls: the codec with the table of bound sessions (fast.c). */
extern struct p11p_fast_io p11p_fast_calls;

/* fast_conn.c: serves the listening socket `fd` in a thread of its own (a thread per
 * connection from then on). 0, or an errno. */
int p11p_fast_accept(int fd);
/* fast_conn.c: ends a connection's mailbox (CLOSED, its waiters woken). */
void p11p_box_close(struct p11p_box *box);

#endif
