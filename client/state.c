/* p11p client — the library's life in a process: C_Initialize's setup, C_Finalize's
 * teardown, the in-flight count every call enters, and fork(). C_Initialize and
 * C_Finalize are serialised by a process mutex (there are no application callbacks
 * before C_Initialize); everything else goes through an atomic phase, an atomic count
 * of calls in flight, and the pool lock. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "debug.h"
#include "direct.h"
#include "find.h"
#include "gen/codes.h"
#include "kept.h"
#include "link.h"
#include "sessions.h"
#include "state.h"

struct p11p_state p11p_state;
static pthread_mutex_t init_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* ---- the calls ---- */

/* Whether this is the process that called C_Initialize (not a child of it). */
static int same_process(const struct p11p_state *s)
{
	return s->same_process != NULL ? *s->same_process == 1 : s->pid == getpid();
}

CK_RV p11p_enter(void)
{
	struct p11p_state *s = &p11p_state;

	atomic_fetch_add(&s->in_flight, 1);
	/* the process check is a second guard: fork() handlers reset the state anyway */
	if (atomic_load(&s->phase) != P11P_READY || !same_process(s)) {
		atomic_fetch_sub(&s->in_flight, 1);
		return CKR_CRYPTOKI_NOT_INITIALIZED;
	}
	return CKR_OK;
}

void p11p_leave(void)
{
	atomic_fetch_sub(&p11p_state.in_flight, 1);
}

/* ---- fork(): the child forgets the parent's connections without a word on them ---- */

static void forget_connections(struct p11p_state *s)
{
	p11p_pool_drop_all(s); /* close() only: the parent keeps its connections */
	p11p_direct_reset(0);
	p11p_sessions_reset();
	p11p_kept_wipe(1);
	memset(s->ctx, 0, sizeof s->ctx);
	atomic_store(&s->in_flight, 0);
	atomic_store(&s->hold_ms, 0);
	atomic_store(&s->phase, P11P_UNINIT);
}

static void atfork_prepare(void)
{
	pthread_mutex_lock(&init_mutex);
	if (atomic_load(&p11p_state.phase) == P11P_READY)
		(void)p11p_lock_acquire(&p11p_state.lock);
}

static void atfork_parent(void)
{
	if (atomic_load(&p11p_state.phase) == P11P_READY)
		p11p_lock_release(&p11p_state.lock);
	pthread_mutex_unlock(&init_mutex);
}

static void atfork_child(void)
{
	struct p11p_state *s = &p11p_state;

	if (atomic_load(&s->phase) == P11P_READY) {
		forget_connections(s);
		p11p_lock_release(&s->lock);
		p11p_lock_destroy(&s->lock);
	}
	pthread_mutex_unlock(&init_mutex);
}

static void register_atfork(void)
{
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* The page of same_process, mapped once for the library's life (a child inherits it
 * zeroed, and sets it at its own C_Initialize). */
static volatile int *fork_page(void)
{
	static volatile int *page;
	size_t size = (size_t)sysconf(_SC_PAGESIZE);
	void *p;

	if (page != NULL)
		return page;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	if (madvise(p, size, MADV_WIPEONFORK) != 0) {
		munmap(p, size);
		return NULL;
	}
	page = p;
	return page;
}

/* ---- C_Initialize ---- */

static void read_settings(struct p11p_state *s)
{
	const char *path = secure_getenv("P11P_SOCKET");
	const char *timeout = secure_getenv("P11P_TIMEOUT_MS");
	const char *debug = secure_getenv("P11P_DEBUG");

	if (path == NULL || path[0] == '\0')
		path = P11P_DEFAULT_SOCKET;
	if (strlen(path) < sizeof s->socket_path)
		strcpy(s->socket_path, path);
	else
		s->socket_path[0] = '\0'; /* too long: every connect fails with CKR_DEVICE_ERROR */
	s->timeout_ms = 0;
	if (timeout != NULL) {
		char *end;
		long ms;

		errno = 0;
		ms = strtol(timeout, &end, 10);
		if (errno == 0 && end != timeout && *end == '\0' && ms > 0 && ms <= 0x7fffffffL)
			s->timeout_ms = (int)ms;
	}
	s->hello_timeout_ms = P11P_HELLO_TIMEOUT_MS;
	if (s->timeout_ms > 0 && s->timeout_ms < s->hello_timeout_ms)
		s->hello_timeout_ms = s->timeout_ms;
	p11p_debug_on = debug != NULL && debug[0] != '\0' && strcmp(debug, "0") != 0;
}

static int new_context_id(unsigned char *ctx, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = getrandom(ctx + got, len - got, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		got += (size_t)n;
	}
	return 0;
}

CK_RV p11p_state_setup(const CK_C_INITIALIZE_ARGS *app)
{
	struct p11p_state *s = &p11p_state;
	CK_RV rv;

	pthread_once(&atfork_once, register_atfork);
	pthread_mutex_lock(&init_mutex);
	if (atomic_load(&s->phase) != P11P_UNINIT) {
		if (s->pid == getpid()) {
			pthread_mutex_unlock(&init_mutex);
			return CKR_CRYPTOKI_ALREADY_INITIALIZED;
		}
		/* a child made without the fork() handlers (a raw clone()) */
		forget_connections(s);
	}
	read_settings(s);
	rv = p11p_lock_init(&s->lock, app);
	if (rv == CKR_OK && new_context_id(s->ctx, sizeof s->ctx) != 0) {
		p11p_lock_destroy(&s->lock);
		rv = CKR_FUNCTION_FAILED;
	}
	if (rv == CKR_OK) {
		s->idle = s->busy = NULL;
		s->nidle = 0;
		s->pid = getpid();
		volatile int *page = fork_page();  /* under init_mutex */

		if (page != NULL)
			*page = 1;
		s->same_process = page;
		p11p_find_reset(); /* a forked child's copies of its parent's searches too */
		p11p_direct_reset(0);
	p11p_sessions_reset();
		p11p_direct_setup();
		atomic_store(&s->in_flight, 0);
		atomic_store(&s->hold_ms, 0);
		atomic_store(&s->phase, P11P_READY);
	}
	pthread_mutex_unlock(&init_mutex);
	return rv;
}

/* ---- C_Finalize ---- */

/* Tells the daemon, on an idle connection, that the context ends now: [2] -> [rv]. */
static void say_goodbye(struct p11p_state *s, struct p11p_conn *conn)
{
	struct p11p_call c;
	char *reply = NULL;
	size_t len = 0;
	int64_t deadline = p11p_deadline(s->hello_timeout_ms);

	memset(&c, 0, sizeof c);
	p11p_codec_begin(&c, P11P_FN_C_Finalize, 0);
	if (!c.err && p11p_send_frame(conn->fd, c.req.data, c.req.size, deadline) == CKR_OK)
		(void)p11p_recv_frame(conn->fd, &reply, &len, deadline);
	free(reply);
	p11p_codec_end(&c);
}

CK_RV p11p_state_teardown(void)
{
	struct p11p_state *s = &p11p_state;
	struct p11p_conn *goodbye;
	const struct timespec pause = { 0, 1000 * 1000 };

	pthread_mutex_lock(&init_mutex);
	if (atomic_load(&s->phase) != P11P_READY || !same_process(s)) {
		pthread_mutex_unlock(&init_mutex);
		return CKR_CRYPTOKI_NOT_INITIALIZED;
	}
	atomic_store(&s->phase, P11P_FINALIZING); /* new calls: CKR_CRYPTOKI_NOT_INITIALIZED */
	(void)p11p_lock_acquire(&s->lock);
	goodbye = p11p_pool_take_idle(s);
	p11p_pool_kill_busy(s); /* unblocks C_WaitForSlotEvent and any other waiting call */
	p11p_lock_release(&s->lock);
	if (goodbye != NULL) {
		say_goodbye(s, goodbye);
		p11p_conn_close(goodbye);
	}
	while (atomic_load(&s->in_flight) > 0)
		nanosleep(&pause, NULL);
	p11p_pool_drop_all(s);
	p11p_find_reset();
	p11p_direct_reset(1);
	p11p_sessions_reset();
	p11p_kept_wipe(0);
	p11p_lock_destroy(&s->lock);
	memset(s->ctx, 0, sizeof s->ctx);
	atomic_store(&s->phase, P11P_UNINIT);
	pthread_mutex_unlock(&init_mutex);
	return CKR_OK;
}
