/* p11p helper — the direct path: the few hot calls an application's client library may
 * send straight to this helper, without the daemon in between (protocol/README.md,
 * "Direct path"). Compiled into the helper's cffi extension; runs in its own threads,
 * never under Python's GIL, so a call here costs one socket hop and no interpreter.
 *
 * The daemon decides everything: it starts the listener (an abstract AF_UNIX name, a
 * 16-byte token, the one uid allowed to connect), and it allows a member session for a
 * virtual session it binds, getting back an id; the client sends that id where a
 * session handle goes. Revoking the id (the daemon moved or closed the session) makes
 * every later call with it answer CKR_SESSION_HANDLE_INVALID, which sends the client
 * back to the daemon. Requests are decoded by hand, strictly, for exactly the shapes
 * served here; anything else is CKR_FUNCTION_NOT_SUPPORTED or closes the connection.
 * Arguments get the daemon path's checks (DESIGN, invariant 5): a mechanism of
 * protocol/mechanisms.spec, whose parameter is a structure, sent with raw bytes is
 * CKR_MECHANISM_PARAM_INVALID (p11p_structured_mechanism() is generated from that file
 * by build_cffi.py), as shapes.unsafe_arguments answers it. The daemon asks how long the oldest
 * call has been inside the module (p11p_fast_stuck) when a client says one hung. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define FAST_TOKEN 16
#define FAST_IDS 4096                    /* bound sessions at once, per helper */
#define FAST_MAX_FRAME (16u << 20)
#define FAST_MAX_OUTPUT (16u << 20)
#define FAST_HELLO_MS 2000
#define FAST_MAX_CONNS 64                /* connections at once: calls in flight, at most */

/* Function codes (protocol/functions.spec). */
#define FN_SIGN_INIT 43
#define FN_SIGN 44
#define FN_GENERATE_RANDOM 65

static struct {
	pthread_mutex_t lock;
	pthread_cond_t idle;
	int listening, stopping;
	unsigned long busy;              /* calls inside the module */
	unsigned long long served;       /* calls answered by the module, ever */
	unsigned conns;                  /* connections open */
	uint64_t since[FAST_MAX_CONNS];  /* when each call inside the module entered (ms), 0: free */
	uid_t uid;
	unsigned char token[FAST_TOKEN];
	uint64_t generation;
	/* bound sessions: calls inside the module on each; a revoked one takes no new call
	 * and is freed once its calls are out (the daemon closes its session next) */
	struct { uint64_t id; CK_SESSION_HANDLE real; unsigned inside; int revoked; } ids[FAST_IDS];
} fast = { .lock = PTHREAD_MUTEX_INITIALIZER, .idle = PTHREAD_COND_INITIALIZER };

/* ---- the table of bound sessions ---- */

/* A new id for member session `real`, or 0 when the table is full. */
unsigned long long p11p_fast_allow(unsigned long real)
{
	uint64_t id = 0;

	pthread_mutex_lock(&fast.lock);
	for (unsigned i = 0; i < FAST_IDS; i++) {
		if (fast.ids[i].id == 0) {
			id = (++fast.generation << 12) | i;
			fast.ids[i].id = id;
			fast.ids[i].real = real;
			break;
		}
	}
	pthread_mutex_unlock(&fast.lock);
	return id;
}

/* Ends a binding: no new call on it, and the calls inside the module on it end first
 * (up to REVOKE_WAIT_S: a call hung longer is the daemon's to kill), so that the daemon's
 * C_CloseSession that follows never meets a call still using the session. */
#define REVOKE_WAIT_S 60
void p11p_fast_revoke(unsigned long long id)
{
	unsigned i = (unsigned)(id & (FAST_IDS - 1));
	struct timespec until;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += REVOKE_WAIT_S;
	pthread_mutex_lock(&fast.lock);
	if (fast.ids[i].id == id && !fast.ids[i].revoked) {
		fast.ids[i].revoked = 1;
		while (fast.ids[i].inside > 0) {
			if (pthread_cond_timedwait(&fast.idle, &fast.lock, &until) == ETIMEDOUT)
				break;
		}
		fast.ids[i].id = 0;
		fast.ids[i].revoked = 0;
	}
	pthread_mutex_unlock(&fast.lock);
}

static uint64_t now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000u + (uint64_t)t.tv_nsec / 1000000u + 1u; /* never 0 */
}

/* Counts a call in (its member session into *real, its place among the calls inside
 * the module into *slot), or refuses it: unknown id, or the module is being
 * finalized. */
static CK_RV enter(uint64_t id, CK_SESSION_HANDLE *real, unsigned *slot)
{
	unsigned i = (unsigned)(id & (FAST_IDS - 1));
	CK_RV rv = CKR_SESSION_HANDLE_INVALID;

	pthread_mutex_lock(&fast.lock);
	if (fast.stopping) {
		rv = CKR_CRYPTOKI_NOT_INITIALIZED;
	} else if (id != 0 && fast.ids[i].id == id && !fast.ids[i].revoked) {
		*real = fast.ids[i].real;
		fast.ids[i].inside++;
		fast.busy++;
		*slot = FAST_MAX_CONNS;
		for (unsigned k = 0; k < FAST_MAX_CONNS; k++) {
			if (fast.since[k] == 0) {  /* one call per connection: always one free */
				fast.since[k] = now_ms();
				*slot = k;
				break;
			}
		}
		rv = CKR_OK;
	}
	pthread_mutex_unlock(&fast.lock);
	return rv;
}

/* Milliseconds the oldest call inside the module has been there; 0: none. */
unsigned long long p11p_fast_stuck(void)
{
	uint64_t oldest = 0, now = now_ms();

	pthread_mutex_lock(&fast.lock);
	for (unsigned k = 0; k < FAST_MAX_CONNS; k++) {
		if (fast.since[k] != 0 && (oldest == 0 || fast.since[k] < oldest))
			oldest = fast.since[k];
	}
	pthread_mutex_unlock(&fast.lock);
	return oldest != 0 && now > oldest ? now - oldest : 0;
}

static void leave(uint64_t id, unsigned slot)
{
	unsigned i = (unsigned)(id & (FAST_IDS - 1));

	pthread_mutex_lock(&fast.lock);
	if (slot < FAST_MAX_CONNS)
		fast.since[slot] = 0;
	fast.served++;
	fast.ids[i].inside--;
	/* one condition for both waits: stop (all calls out) and revoke (this id's out) */
	if (--fast.busy == 0 || (fast.ids[i].revoked && fast.ids[i].inside == 0))
		pthread_cond_broadcast(&fast.idle);
	pthread_mutex_unlock(&fast.lock);
}

/* Calls served on the direct path so far (the daemon adds them to its counts). */
unsigned long long p11p_fast_served(void)
{
	unsigned long long n;

	pthread_mutex_lock(&fast.lock);
	n = fast.served;
	pthread_mutex_unlock(&fast.lock);
	return n;
}

/* Before C_Finalize: no new call starts, running ones end (up to grace_ms). */
void p11p_fast_stop(int grace_ms)
{
	struct timespec until;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += grace_ms / 1000;
	until.tv_nsec += (long)(grace_ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&fast.lock);
	fast.stopping = 1;
	while (fast.busy > 0) {
		if (pthread_cond_timedwait(&fast.idle, &fast.lock, &until) == ETIMEDOUT)
			break;
	}
	pthread_mutex_unlock(&fast.lock);
}

/* ---- strict reading of the few request shapes ---- */

struct rd {
	const uint8_t *p, *end;
	int bad;
};

static uint64_t rd_be(struct rd *r, size_t n)
{
	uint64_t v = 0;

	if (r->bad || (size_t)(r->end - r->p) < n) {
		r->bad = 1;
		return 0;
	}
	for (size_t i = 0; i < n; i++)
		v = (v << 8) | *r->p++;
	return v;
}

static int rd_nil(struct rd *r)
{
	if (!r->bad && r->p < r->end && *r->p == 0xc0) {
		r->p++;
		return 1;
	}
	return 0;
}

static uint64_t rd_uint(struct rd *r)
{
	uint8_t b = (uint8_t)rd_be(r, 1);

	if (r->bad)
		return 0;
	if (b <= 0x7f)
		return b;
	if (b >= 0xcc && b <= 0xcf)
		return rd_be(r, (size_t)1 << (b - 0xcc));
	r->bad = 1;
	return 0;
}

static uint32_t rd_array(struct rd *r)
{
	uint8_t b = (uint8_t)rd_be(r, 1);

	if (r->bad)
		return 0;
	if ((b & 0xf0) == 0x90)
		return b & 0x0f;
	if (b == 0xdc)
		return (uint32_t)rd_be(r, 2);
	if (b == 0xdd)
		return (uint32_t)rd_be(r, 4);
	r->bad = 1;
	return 0;
}

static const uint8_t *rd_bin(struct rd *r, CK_ULONG *len)
{
	uint8_t b = (uint8_t)rd_be(r, 1);
	uint64_t n;
	const uint8_t *p;

	if (r->bad)
		return NULL;
	if (b < 0xc4 || b > 0xc6) {
		r->bad = 1;
		return NULL;
	}
	n = rd_be(r, (size_t)1 << (b - 0xc4));
	if (r->bad || n > (uint64_t)(r->end - r->p)) {
		r->bad = 1;
		return NULL;
	}
	p = r->p;
	r->p += n;
	*len = (CK_ULONG)n;
	return p;
}

/* ---- writing replies: [rv], [rv, uint] or [rv, bin] ---- */

struct wr {
	uint8_t *buf;
	size_t len, cap;
};

static int wr_reserve(struct wr *w, size_t n)
{
	if (w->cap - w->len >= n)
		return 0;
	size_t cap = w->cap ? w->cap : 256;
	while (cap - w->len < n)
		cap *= 2;
	uint8_t *p = realloc(w->buf, cap);
	if (p == NULL)
		return -1;
	w->buf = p;
	w->cap = cap;
	return 0;
}

static void wr_be(struct wr *w, uint8_t tag, uint64_t v, size_t n)
{
	w->buf[w->len++] = tag;
	for (size_t i = n; i > 0; i--)
		w->buf[w->len++] = (uint8_t)(v >> (8 * (i - 1)));
}

static void wr_uint(struct wr *w, uint64_t v)
{
	if (v <= 0x7f)
		w->buf[w->len++] = (uint8_t)v;
	else if (v <= 0xff)
		wr_be(w, 0xcc, v, 1);
	else if (v <= 0xffff)
		wr_be(w, 0xcd, v, 2);
	else if (v <= 0xffffffffu)
		wr_be(w, 0xce, v, 4);
	else
		wr_be(w, 0xcf, v, 8);
}

/* Starts a reply of `n` elements with rv, leaving room for a bin of `extra` bytes. */
static int wr_begin(struct wr *w, unsigned n, CK_RV rv, size_t extra)
{
	w->len = 0;
	if (wr_reserve(w, 4 + 1 + 9 + 9 + extra) != 0)
		return -1;
	w->len = 4;
	w->buf[w->len++] = (uint8_t)(0x90 | n);
	wr_uint(w, rv);
	return 0;
}

/* The header of a bin of n bytes; the caller writes the bytes at w->buf + w->len. */
static void wr_bin_header(struct wr *w, size_t n)
{
	if (n <= 0xff)
		wr_be(w, 0xc4, n, 1);
	else if (n <= 0xffff)
		wr_be(w, 0xc5, n, 2);
	else
		wr_be(w, 0xc6, n, 4);
}

/* ---- the calls ---- */

struct conn {
	int fd;
	CK_FUNCTION_LIST_PTR module;
	struct wr out;
	uint8_t *in;
	size_t in_cap;
};

static int reply_rv(struct conn *c, CK_RV rv)
{
	return wr_begin(&c->out, 1, rv, 0);
}

static int generate_random(struct conn *c, struct rd *r, CK_SESSION_HANDLE s)
{
	uint64_t n = rd_uint(r);
	CK_RV rv;

	if (r->bad || r->p != r->end || n > FAST_MAX_OUTPUT)
		return reply_rv(c, CKR_ARGUMENTS_BAD);
	if (wr_begin(&c->out, 2, CKR_OK, n + 1) != 0)
		return reply_rv(c, CKR_HOST_MEMORY);
	wr_bin_header(&c->out, n);
	memset(c->out.buf + c->out.len, 0, n + 1);
	rv = c->module->C_GenerateRandom(s, c->out.buf + c->out.len, n);
	if (rv != CKR_OK)
		return reply_rv(c, rv);
	c->out.len += n;
	return 0;
}

static int sign_init(struct conn *c, struct rd *r, CK_SESSION_HANDLE s)
{
	CK_MECHANISM m = { 0, NULL, 0 };
	CK_OBJECT_HANDLE key;

	if (rd_array(r) != 2 || r->bad)
		return reply_rv(c, CKR_ARGUMENTS_BAD);
	m.mechanism = rd_uint(r);
	if (!rd_nil(r))
		m.pParameter = (void *)rd_bin(r, &m.ulParameterLen);
	key = rd_uint(r);
	if (r->bad || r->p != r->end)
		return reply_rv(c, CKR_ARGUMENTS_BAD);
	/* the module would take the bytes for its structure and follow pointers in them */
	if (m.pParameter != NULL && p11p_structured_mechanism(m.mechanism))
		return reply_rv(c, CKR_MECHANISM_PARAM_INVALID);
	return reply_rv(c, c->module->C_SignInit(s, &m, key));
}

static int sign(struct conn *c, struct rd *r, CK_SESSION_HANDLE s)
{
	CK_ULONG len = 0, cap = 0;
	const uint8_t *data = rd_bin(r, &len);
	int query = rd_nil(r);
	CK_RV rv;

	if (!query)
		cap = rd_uint(r);
	if (r->bad || r->p != r->end || cap > FAST_MAX_OUTPUT)
		return reply_rv(c, CKR_ARGUMENTS_BAD);
	if (wr_begin(&c->out, 2, CKR_OK, cap + 6) != 0)
		return reply_rv(c, CKR_HOST_MEMORY);
	/* the bin header goes before the signature: room for its largest form */
	uint8_t *buf = c->out.buf + c->out.len + 5;
	CK_ULONG out_len = cap;
	if (!query)
		memset(buf, 0, cap ? cap : 1);
	rv = c->module->C_Sign(s, (CK_BYTE_PTR)(len ? data : (const uint8_t *)""), len,
			       query ? NULL : buf, &out_len);
	if (rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && query)) {
		wr_begin(&c->out, 2, rv, 0);
		wr_uint(&c->out, out_len);
		return 0;
	}
	if (rv != CKR_OK)
		return reply_rv(c, rv);
	if (out_len > cap)
		out_len = cap;
	wr_bin_header(&c->out, out_len);
	memmove(c->out.buf + c->out.len, buf, out_len);
	c->out.len += out_len;
	return 0;
}

/* One request body; the reply is in c->out. -1: close the connection. */
static int serve_one(struct conn *c, const uint8_t *body, size_t len)
{
	struct rd r = { body, body + len, 0 };
	uint32_t n = rd_array(&r);
	uint64_t code = rd_uint(&r), id = rd_uint(&r);
	CK_SESSION_HANDLE s = 0;
	CK_RV rv;
	unsigned slot = FAST_MAX_CONNS;
	int ret;

	if (r.bad || n < 2)
		return -1;
	if (code != FN_GENERATE_RANDOM && code != FN_SIGN_INIT && code != FN_SIGN)
		return reply_rv(c, CKR_FUNCTION_NOT_SUPPORTED);
	if ((code == FN_SIGN_INIT && n != 4) || (code == FN_SIGN && n != 4) ||
	    (code == FN_GENERATE_RANDOM && n != 3))
		return reply_rv(c, CKR_ARGUMENTS_BAD);
	rv = enter(id, &s, &slot);
	if (rv != CKR_OK)
		return reply_rv(c, rv);
	if (code == FN_GENERATE_RANDOM)
		ret = generate_random(c, &r, s);
	else if (code == FN_SIGN_INIT)
		ret = sign_init(c, &r, s);
	else
		ret = sign(c, &r, s);
	leave(id, slot);
	return ret;
}

/* ---- connections ---- */

static int io_all(int fd, void *buf, size_t n, int writing)
{
	uint8_t *p = buf;

	while (n > 0) {
		ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

static int hello(int fd)
{
	unsigned char token[FAST_TOKEN];
	struct pollfd pfd = { fd, POLLIN, 0 };
	size_t got = 0;
	unsigned char diff = 0;

	while (got < sizeof token) {
		if (poll(&pfd, 1, FAST_HELLO_MS) <= 0)
			return -1;
		ssize_t k = recv(fd, token + got, sizeof token - got, 0);
		if (k <= 0)
			return -1;
		got += (size_t)k;
	}
	for (size_t i = 0; i < sizeof token; i++)
		diff |= token[i] ^ fast.token[i];
	return diff ? -1 : 0;
}

static void *conn_main(void *arg)
{
	struct conn *c = arg;
	uint8_t header[4];

	if (hello(c->fd) != 0)
		goto out;
	for (;;) {
		if (io_all(c->fd, header, 4, 0) != 0)
			break;
		uint32_t size = (uint32_t)header[0] << 24 | (uint32_t)header[1] << 16 |
				(uint32_t)header[2] << 8 | header[3];
		if (size > FAST_MAX_FRAME)
			break;
		if (size > c->in_cap) {
			uint8_t *p = realloc(c->in, size);
			if (p == NULL)
				break;
			c->in = p;
			c->in_cap = size;
		}
		if (io_all(c->fd, c->in, size, 0) != 0)
			break;
		if (serve_one(c, c->in, size) != 0)
			break;
		uint32_t body = (uint32_t)(c->out.len - 4);
		c->out.buf[0] = (uint8_t)(body >> 24);
		c->out.buf[1] = (uint8_t)(body >> 16);
		c->out.buf[2] = (uint8_t)(body >> 8);
		c->out.buf[3] = (uint8_t)body;
		if (io_all(c->fd, c->out.buf, c->out.len, 1) != 0)
			break;
	}
out:
	close(c->fd);
	free(c->in);
	free(c->out.buf);
	free(c);
	pthread_mutex_lock(&fast.lock);
	fast.conns--;
	pthread_mutex_unlock(&fast.lock);
	return NULL;
}

static int start_thread(void *(*fn)(void *), void *arg)
{
	pthread_attr_t attr;
	pthread_t t;
	int err;

	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	err = pthread_create(&t, &attr, fn, arg);
	pthread_attr_destroy(&attr);
	return err;
}

static void *accept_main(void *arg)
{
	int lfd = (int)(intptr_t)arg;

	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				usleep(10000);
				continue;
			}
			return NULL;
		}
		struct ucred cred;
		socklen_t clen = sizeof cred;
		struct conn *c = NULL;
		int full;
		pthread_mutex_lock(&fast.lock);
		full = fast.conns >= FAST_MAX_CONNS;
		if (!full)
			fast.conns++;
		pthread_mutex_unlock(&fast.lock);
		if (full || getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 ||
		    cred.uid != fast.uid || (c = calloc(1, sizeof *c)) == NULL ||
		    (c->fd = fd, c->module = p11p_module, start_thread(conn_main, c) != 0)) {
			close(fd);
			free(c);
			if (!full) {
				pthread_mutex_lock(&fast.lock);
				fast.conns--;
				pthread_mutex_unlock(&fast.lock);
			}
		}
	}
}

/* Listens on the abstract name `name` for connections of `uid` presenting `token`.
 * 0, or an errno. Once per process; a second call changes nothing and returns 0. */
int p11p_fast_start(const char *name, size_t name_len, const unsigned char *token,
		    unsigned int uid)
{
	struct sockaddr_un addr;
	int fd, err = 0;

	if (name_len == 0 || name_len + 1 > sizeof addr.sun_path)
		return EINVAL;
	pthread_mutex_lock(&fast.lock);
	if (fast.listening)
		goto out;
	memset(&addr, 0, sizeof addr);
	addr.sun_family = AF_UNIX;
	memcpy(addr.sun_path + 1, name, name_len);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		err = errno;
		goto out;
	}
	if (bind(fd, (struct sockaddr *)&addr,
		 (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + name_len)) != 0 ||
	    listen(fd, 64) != 0) {
		err = errno;
		close(fd);
		goto out;
	}
	memcpy(fast.token, token, FAST_TOKEN);
	fast.uid = uid;
	err = start_thread(accept_main, (void *)(intptr_t)fd);
	if (err != 0)
		close(fd);
	else
		fast.listening = 1;
out:
	pthread_mutex_unlock(&fast.lock);
	return err;
}
