/* p11p client — the connection pool and the round trip. A calling thread borrows a
 * connection (an idle one, or a new one that sends the hello), owns it for one request
 * and its reply, and gives it back; the pool lock is held only to move connections
 * between the idle and busy lists, never across a round trip, so calls from many
 * threads run concurrently on as many connections. The caller keeps the connection
 * until the reply is decoded (p11p_release). A connection that failed in any way (I/O,
 * time-out, a reply that breaks the protocol) is closed; the next call makes a new one
 * (that is how the client reconnects to a restarted daemon). A connection that cannot
 * be made at all is told once per process (notice.c). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "debug.h"
#include "gen/codes.h"
#include "gen/versions.h"
#include "kept.h"
#include "link.h"
#include "notice.h"
#include "sessions.h"
#include "state.h"

static void list_push(struct p11p_conn **head, struct p11p_conn *c)
{
	c->prev = NULL;
	c->next = *head;
	if (*head)
		(*head)->prev = c;
	*head = c;
}

static void list_remove(struct p11p_conn **head, struct p11p_conn *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		*head = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = c->next = NULL;
}

void p11p_conn_close(struct p11p_conn *conn)
{
	if (conn->fd >= 0)
		close(conn->fd);
	free(conn);
}

struct p11p_conn *p11p_pool_take_idle(struct p11p_state *s)
{
	struct p11p_conn *conn;

	while ((conn = s->idle) != NULL) {
		list_remove(&s->idle, conn);
		s->nidle--;
		if (p11p_socket_idle_ok(conn->fd))
			return conn;
		/* the daemon closed it while it was idle (restart, context ended) */
		p11p_debug("dropping an idle connection the daemon closed");
		p11p_conn_close(conn);
	}
	return NULL;
}

void p11p_pool_kill_busy(struct p11p_state *s)
{
	for (struct p11p_conn *c = s->busy; c; c = c->next) {
		c->killed = 1;
		shutdown(c->fd, SHUT_RDWR);
	}
}

void p11p_pool_drop_all(struct p11p_state *s)
{
	struct p11p_conn *c;

	while ((c = s->idle) != NULL) {
		list_remove(&s->idle, c);
		p11p_conn_close(c);
	}
	while ((c = s->busy) != NULL) {
		list_remove(&s->busy, c);
		p11p_conn_close(c);
	}
	s->nidle = 0;
}

/* Returns a borrowed connection: to the idle list when it is healthy and wanted, else
 * closed. Returns whether C_Finalize shut it down. */
static int give_back(struct p11p_state *s, struct p11p_conn *conn, int healthy)
{
	int killed, keep;

	(void)p11p_lock_acquire(&s->lock);
	list_remove(&s->busy, conn);
	killed = conn->killed;
	keep = healthy && !killed && !conn->closing && atomic_load(&s->phase) == P11P_READY &&
	       s->nidle < P11P_MAX_IDLE;
	if (keep) {
		list_push(&s->idle, conn);
		s->nidle++;
	} else {
		p11p_conn_close(conn); /* under the lock: a fork never sees an fd off the lists */
	}
	p11p_lock_release(&s->lock);
	return killed || atomic_load(&s->phase) != P11P_READY;
}

/* quiet: a failed connect is not told (the caller waits for a restarted daemon) */
static CK_RV borrow(struct p11p_state *s, struct p11p_conn **out, int *fresh, int quiet)
{
	struct p11p_conn *conn;
	char why_text[128];
	struct p11p_welcome welcome;
	const char *why;
	int64_t deadline;
	CK_RV rv;

	rv = p11p_lock_acquire(&s->lock);
	if (rv != CKR_OK)
		return rv;
	if (atomic_load(&s->phase) != P11P_READY) {
		p11p_lock_release(&s->lock);
		return CKR_CRYPTOKI_NOT_INITIALIZED;
	}
	conn = p11p_pool_take_idle(s);
	if (conn != NULL) {
		list_push(&s->busy, conn);
		p11p_lock_release(&s->lock);
		*out = conn;
		*fresh = 0;
		return CKR_OK;
	}
	conn = calloc(1, sizeof *conn);
	if (conn == NULL) {
		p11p_lock_release(&s->lock);
		return CKR_HOST_MEMORY;
	}
	conn->fd = p11p_socket_new();
	if (conn->fd < 0) {
		p11p_lock_release(&s->lock);
		free(conn);
		return CKR_DEVICE_ERROR;
	}
	list_push(&s->busy, conn); /* from now on C_Finalize can shut it down */
	p11p_lock_release(&s->lock);

	deadline = p11p_deadline(s->hello_timeout_ms);
	rv = p11p_socket_connect(conn->fd, s->socket_path, deadline);
	if (rv != CKR_OK) {
		why = strerror_r(errno, why_text, sizeof why_text);
	} else {
		rv = p11p_hello(conn->fd, s->ctx, deadline, &welcome);
		why = welcome.why[0] ? welcome.why
				     : "it accepted the connection, but the hello failed";
		conn->version = welcome.version;
		conn->features = welcome.features;
		if (rv == CKR_OK) {
			p11p_sessions_welcome(welcome.features, welcome.max_sessions);
			atomic_store(&s->hold_ms, (welcome.features & P11P_FEATURE_restart)
						      ? (long)welcome.hold_ms : 0L);
			if ((welcome.features & P11P_FEATURE_resume) && welcome.has_key)
				p11p_kept_key(welcome.key);
		}
		explicit_bzero(welcome.key, sizeof welcome.key);
	}
	if (rv == CKR_OK) {
		/* C_Finalize may have come while we connected: shutdown() does nothing to a
		 * socket that was not connected yet, so look again. */
		(void)p11p_lock_acquire(&s->lock);
		if (conn->killed || atomic_load(&s->phase) != P11P_READY)
			rv = CKR_CRYPTOKI_NOT_INITIALIZED;
		p11p_lock_release(&s->lock);
	}
	if (rv != CKR_OK) {
		if (give_back(s, conn, 0))
			return CKR_CRYPTOKI_NOT_INITIALIZED;
		if (rv != CKR_HOST_MEMORY && !(quiet && rv == P11P_RV_NO_DAEMON))
			p11p_notice_unreachable(s->socket_path[0] ? s->socket_path
						: "$P11P_SOCKET", why);
		return rv;
	}
	p11p_debug("new connection");
	*out = conn;
	*fresh = 1;
	return CKR_OK;
}

void p11p_release(void *conn, int healthy)
{
	give_back(&p11p_state, conn, healthy);
}

/* The reply of a daemon that stops for a restart to a call it did not begin, [RETRY],
 * as a frame. A daemon that stops writes it on every idle connection as it closes it (a
 * call sent that it did not read takes it as its answer), so it may come right behind
 * the reply of the call before, in the same recv. */
static const unsigned char retry_frame[] = { 0, 0, 0, 6, 0x91, 0xce, 0xf0, 0x11, 0x00, 0x02 };

static int is_retry(const char *body, size_t len)
{
	return len == sizeof retry_frame - 4 && memcmp(body, retry_frame + 4, len) == 0;
}

/* Calls that change nothing: one the daemon may have begun when it went away can be
 * sent again to the next daemon. */
static int read_only(unsigned long code)
{
	switch (code) {
	case P11P_FN_C_GetInfo: case P11P_FN_C_GetSlotList: case P11P_FN_C_GetSlotInfo:
	case P11P_FN_C_GetTokenInfo: case P11P_FN_C_GetMechanismList:
	case P11P_FN_C_GetMechanismInfo: case P11P_FN_C_GetSessionInfo:
	case P11P_FN_C_GetAttributeValue: case P11P_FN_C_GetObjectSize:
		return 1;
	default:
		return 0;
	}
}

/* While the daemon restarts (it agreed the link feature restart): whether a call may
 * still wait for the next one, its wait beginning at the first sign (*until). */
static int may_wait(struct p11p_state *s, int64_t *until)
{
	long hold = atomic_load(&s->hold_ms);

	if (hold <= 0 || atomic_load(&s->phase) != P11P_READY)
		return 0;
	if (*until == 0)
		*until = p11p_now_ms() + hold;
	if (p11p_now_ms() >= *until)
		return 0;
	p11p_debug("waiting for a restarted daemon");
	return 1;
}

static void pause_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

CK_RV p11p_roundtrip(unsigned long code, char *frame, size_t len, char **reply,
		     size_t *reply_len, void **held)
{
	struct p11p_state *s = &p11p_state;
	/* C_WaitForSlotEvent may rightly block for as long as no slot changes */
	int timeout = code == P11P_FN_C_WaitForSlotEvent ? 0 : s->timeout_ms;
	int64_t until = 0;

	for (int attempt = 0;; attempt++) {
		struct p11p_conn *conn;
		int fresh, sent;
		int64_t deadline;
		/* told only once the wait for a restarted daemon is over */
		int quiet = atomic_load(&s->hold_ms) > 0 &&
			    (until == 0 || p11p_now_ms() < until);
		CK_RV rv = borrow(s, &conn, &fresh, quiet);

		if (rv == P11P_RV_NO_DAEMON && may_wait(s, &until)) {
			pause_ms(20);
			continue;
		}
		if (rv != CKR_OK)
			return rv;
		deadline = p11p_deadline(timeout);
		rv = p11p_send_frame(conn->fd, frame, len, deadline);
		sent = rv == CKR_OK;
		if (sent && (conn->features & P11P_FEATURE_restart))
			rv = p11p_recv_then(conn->fd, reply, reply_len, deadline, retry_frame,
					    sizeof retry_frame, &conn->closing);
		else if (sent)
			rv = p11p_recv_frame(conn->fd, reply, reply_len, deadline);
		if (rv == CKR_OK && !((conn->features & P11P_FEATURE_restart) &&
				      is_retry(*reply, *reply_len))) {
			*held = conn; /* given back by p11p_release once the reply is decoded */
			return CKR_OK;
		}
		if (rv == CKR_OK) { /* not begun: the daemon stops for a restart */
			free(*reply);
			*reply = NULL;
			rv = give_back(s, conn, 0) ? CKR_CRYPTOKI_NOT_INITIALIZED : CKR_DEVICE_ERROR;
			if (rv == CKR_DEVICE_ERROR && may_wait(s, &until))
				continue;
			return rv;
		}
		if (give_back(s, conn, 0))
			return CKR_CRYPTOKI_NOT_INITIALIZED;
		/* A pooled connection that fails before the whole request went out was stale:
		 * the daemon cannot have run the call, so it is safe to try once more. */
		if (!sent && !fresh && attempt == 0 && rv == CKR_DEVICE_ERROR)
			continue;
		/* the daemon went away: a call it cannot have run, or one that changes
		 * nothing, goes to the next daemon */
		if (rv == CKR_DEVICE_ERROR && (!sent || read_only(code)) && may_wait(s, &until))
			continue;
		return rv;
	}
}
