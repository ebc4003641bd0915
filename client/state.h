/* p11p client — the library's state in this process: initialised or not, the
 * application context id, the settings read at C_Initialize, and the connection pool.
 * There is one instance per process; after fork() the child's copy is reset to
 * "not initialised" (PKCS#11 requires the child to call C_Initialize again). */
#ifndef P11P_STATE_H
#define P11P_STATE_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>
#include <sys/un.h>

#include "lock.h"
#include "transport.h"

#define P11P_DEFAULT_SOCKET "/run/p11p/p11p.sock"
#define P11P_HELLO_TIMEOUT_MS 5000
#define P11P_MAX_IDLE 32

enum p11p_phase { P11P_UNINIT = 0, P11P_READY, P11P_FINALIZING };

/* One connection to the daemon. It is always on exactly one of the pool's lists (idle
 * or busy) while its fd is open, so C_Finalize and fork() find every one of them. */
struct p11p_conn {
	int fd;
	int killed;                 /* shut down by C_Finalize while busy */
	int closing;                /* a RETRY came behind its last reply: the daemon closes it */
	unsigned version;           /* what its hello agreed on (struct p11p_welcome) */
	unsigned features;
	struct p11p_conn *prev, *next;
};

struct p11p_state {
	atomic_int phase;
	atomic_long in_flight;      /* calls between p11p_enter and p11p_leave */
	pid_t pid;                  /* the process that called C_Initialize */
	/* a page the kernel zeroes in a child (MADV_WIPEONFORK), 1 in this process: the
	 * fork guard of every call without a getpid(); NULL where the kernel lacks it */
	volatile const int *same_process;
	unsigned char ctx[P11P_CTX_SIZE];
	char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path) + 1];
	int timeout_ms;             /* reply time-out of ordinary calls; 0: none */
	int hello_timeout_ms;       /* connect + hello */
	atomic_long hold_ms;        /* a restarted daemon is waited for this long (0: not) */
	struct p11p_lock lock;      /* guards the lists below */
	struct p11p_conn *idle, *busy;
	unsigned nidle;
};

extern struct p11p_state p11p_state;

/* C_Initialize's work, under the init mutex; app: callbacks to lock with, or NULL. */
CK_RV p11p_state_setup(const CK_C_INITIALIZE_ARGS *app);
/* C_Finalize's work. */
CK_RV p11p_state_teardown(void);

/* pool.c */
/* Under the pool lock: takes a usable idle connection off the pool (or NULL). */
struct p11p_conn *p11p_pool_take_idle(struct p11p_state *s);
/* Under the pool lock: shuts down every busy connection (their calls return). */
void p11p_pool_kill_busy(struct p11p_state *s);
/* Closes every connection of the pool without sending anything (fork, teardown). */
void p11p_pool_drop_all(struct p11p_state *s);
void p11p_conn_close(struct p11p_conn *conn);

#endif
