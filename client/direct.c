/* p11p client — the direct path (see direct.h). A table of the sessions that made hot
 * calls (bound or not, and where their sign operation runs), and per helper listener
 * (an endpoint) a stack of idle connections. Both are guarded by the library's lock;
 * the calls themselves run outside it, each on a connection of its own. */
#include <errno.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "call.h"
#include "direct.h"
#include "gen/codes.h"
#include "link.h"
#include "state.h"

#define BUCKETS 256
#define EP_IDLE 16             /* idle connections kept per endpoint */
#define MAX_FALLBACK 64
#define TOKEN 16
#define KEYS 4                 /* member key handles remembered per session */
#define BIND_AFTER 3           /* hot calls through the daemon before asking to bind */
#define BIND_RETRY_MS 1000     /* after a refusal or an unbind */
#define DIRECT_MAX_DATA (1u << 20)
#define TERMINATE_CAP 16384    /* a signature buffer that fits any signature */
#define SPIN_NS 60000          /* a lone call waits this long awake for its reply */

enum { OP_NONE, OP_DIRECT, OP_DAEMON };
/* Why a session is unbound (daemon/direct.py) */
enum { WHY_RETURNED = 0, WHY_LEAVING = 1, WHY_BROKEN = 2, WHY_TIMEOUT = 3 };

/* An endpoint's name, token, time-out and fallback list are set when it is made and
 * never change (a helper's listener keeps its name for life), so a call reads them
 * without the lock; its idle connections are under the lock. */
struct ep {
	struct ep *next;
	char name[101];
	size_t name_len;
	unsigned char token[TOKEN];
	int timeout_ms;
	CK_RV fallback[MAX_FALLBACK];
	unsigned nfallback;
	int idle[EP_IDLE];
	unsigned nidle;
};

struct sess {
	struct sess *next;
	CK_SESSION_HANDLE h;
	CK_SLOT_ID slot;
	struct ep *ep;              /* bound: its helper's endpoint; NULL: not bound */
	uint64_t id;                /* bound: what the helper knows the session by */
	unsigned calls;             /* hot calls through the daemon since the last unbind */
	int64_t retry_ms;           /* not bound: no bind request before this */
	int sign;                   /* where the sign operation runs: OP_* */
	CK_MECHANISM_TYPE sign_mech;
	CK_OBJECT_HANDLE sign_key;
	struct { CK_OBJECT_HANDLE v, m; } keys[KEYS];
	unsigned nkeys, key_gen;
};

/* A binding as a call uses it, copied out under the lock. */
struct bound {
	struct ep *ep;
	uint64_t id;
};

static struct sess *table[BUCKETS];
static struct ep *eps;
static unsigned destroy_gen;   /* C_DestroyObject calls: remembered key handles expire */
static int disabled;
static atomic_int in_flight;   /* direct calls waiting for their reply */

static int lock(void)
{
	return p11p_lock_acquire(&p11p_state.lock) == CKR_OK;
}

static void unlock(void)
{
	p11p_lock_release(&p11p_state.lock);
}

void p11p_direct_setup(void)
{
	const char *env = secure_getenv("P11P_DIRECT");

	disabled = env != NULL && strcmp(env, "0") == 0;
}

void p11p_direct_reset(void)
{
	for (unsigned i = 0; i < BUCKETS; i++) {
		while (table[i] != NULL) {
			struct sess *s = table[i];

			table[i] = s->next;
			free(s);
		}
	}
	while (eps != NULL) {
		struct ep *ep = eps;

		eps = ep->next;
		for (unsigned i = 0; i < ep->nidle; i++)
			close(ep->idle[i]);
		free(ep);
	}
}

/* ---- the session table (under the lock) ---- */

static struct sess **slot_of(CK_SESSION_HANDLE h)
{
	struct sess **p = &table[(h ^ (h >> 8)) % BUCKETS];

	while (*p != NULL && (*p)->h != h)
		p = &(*p)->next;
	return p;
}

static struct sess *lookup(CK_SESSION_HANDLE h)
{
	return *slot_of(h);
}

static void drop_where(int (*match)(const struct sess *, CK_ULONG), CK_ULONG arg)
{
	for (unsigned i = 0; i < BUCKETS; i++) {
		struct sess **p = &table[i];

		while (*p != NULL) {
			if (match(*p, arg)) {
				struct sess *s = *p;

				*p = s->next;
				free(s);
			} else {
				p = &(*p)->next;
			}
		}
	}
}

static int is_session(const struct sess *s, CK_ULONG h)
{
	return s->h == h;
}

static int on_slot(const struct sess *s, CK_ULONG slot)
{
	return s->ep == NULL || s->slot == slot;
}

/* The daemon's answer says the session exists: it is counted (and made known). */
static void count_call(CK_SESSION_HANDLE h, CK_RV rv)
{
	struct sess *s;

	if (disabled || rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
	    rv == CKR_CRYPTOKI_NOT_INITIALIZED || rv == CKR_DEVICE_ERROR || !lock())
		return;
	s = lookup(h);
	if (s == NULL && (s = calloc(1, sizeof *s)) != NULL) {
		s->h = h;
		s->next = table[(h ^ (h >> 8)) % BUCKETS];
		table[(h ^ (h >> 8)) % BUCKETS] = s;
	}
	if (s != NULL)
		s->calls++;
	unlock();
}

static int sign_state(CK_SESSION_HANDLE h, CK_MECHANISM_TYPE *mech, CK_OBJECT_HANDLE *key)
{
	struct sess *s;
	int op = OP_NONE;

	if (!lock())
		return OP_NONE;
	s = lookup(h);
	if (s != NULL) {
		op = s->sign;
		*mech = s->sign_mech;
		*key = s->sign_key;
	}
	unlock();
	return op;
}

static void set_sign(CK_SESSION_HANDLE h, int op, CK_MECHANISM_TYPE mech, CK_OBJECT_HANDLE key)
{
	struct sess *s;

	if (!lock())
		return;
	s = lookup(h);
	if (s != NULL) {
		s->sign = op;
		s->sign_mech = mech;
		s->sign_key = key;
	}
	unlock();
}

/* After C_Sign or C_SignFinal: the operation goes on only after a length query or
 * CKR_BUFFER_TOO_SMALL (PKCS#11 §5.2). */
static void sign_done(CK_SESSION_HANDLE h, CK_RV rv, CK_BYTE_PTR out)
{
	if ((rv == CKR_OK && out == NULL) || rv == CKR_BUFFER_TOO_SMALL)
		return;
	set_sign(h, OP_NONE, 0, 0);
}

/* ---- endpoints and their connections ---- */

static int is_fallback(const struct ep *ep, CK_RV rv)
{
	for (unsigned i = 0; i < ep->nfallback; i++)
		if (ep->fallback[i] == rv)
			return 1;
	return 0;
}

/* A connection to the endpoint: an idle one, or a new one that has sent the token. */
static int ep_take(struct ep *ep)
{
	struct sockaddr_un addr;
	int fd = -1;

	if (lock()) {
		if (ep->nidle > 0)
			fd = ep->idle[--ep->nidle];
		unlock();
	}
	if (fd >= 0)
		return fd;
	memset(&addr, 0, sizeof addr);
	addr.sun_family = AF_UNIX;
	memcpy(addr.sun_path + 1, ep->name, ep->name_len);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&addr,
		    (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + ep->name_len)) != 0) {
		close(fd);
		return -1;
	}
	/* the token: 16 bytes into an empty socket buffer, never a short write */
	if (send(fd, ep->token, TOKEN, MSG_NOSIGNAL) != TOKEN) {
		close(fd);
		return -1;
	}
	return fd;
}

static void ep_give(struct ep *ep, int fd)
{
	if (lock()) {
		if (ep->nidle < EP_IDLE) {
			ep->idle[ep->nidle++] = fd;
			fd = -1;
		}
		unlock();
	}
	if (fd >= 0)
		close(fd);
}

/* Under the lock: the endpoint of this name, or a new one made from the DIRECT_BIND
 * reply's fields (f: name, token, ..., [rv...]). */
static struct ep *ep_get(const msgpack_object *f, int timeout_ms)
{
	const msgpack_object *rvs = &f[5];
	struct ep *ep;
	CK_RV rv;

	for (ep = eps; ep != NULL; ep = ep->next)
		if (ep->name_len == f[0].via.bin.size &&
		    memcmp(ep->name, f[0].via.bin.ptr, ep->name_len) == 0)
			return ep;
	ep = calloc(1, sizeof *ep);
	if (ep == NULL)
		return NULL;
	memcpy(ep->name, f[0].via.bin.ptr, f[0].via.bin.size);
	ep->name_len = f[0].via.bin.size;
	memcpy(ep->token, f[1].via.bin.ptr, TOKEN);
	ep->timeout_ms = timeout_ms;
	for (uint32_t i = 0; i < rvs->via.array.size; i++)
		if (p11p_obj_ulong(&rvs->via.array.ptr[i], &rv) == 0)
			ep->fallback[ep->nfallback++] = rv;
	ep->next = eps;
	eps = ep;
	return ep;
}

/* Its helper is gone or broke a connection: the idle connections go too. */
static void ep_broken(struct ep *ep)
{
	int fds[EP_IDLE];
	unsigned n = 0;

	if (!lock())
		return;
	while (ep->nidle > 0)
		fds[n++] = ep->idle[--ep->nidle];
	unlock();
	while (n > 0)
		close(fds[--n]);
}

/* ---- one direct call ---- */

/* The reply of a quick call comes back within a few tens of microseconds; blocking
 * for it costs a wake-up on another CPU (about 50 µs here). So a call that is the
 * only one in flight in this process watches its socket for SPIN_NS first; with more
 * calls in flight the CPUs have other work, and it blocks at once. */
static void await_reply(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	struct timespec start, now;

	if (atomic_load_explicit(&in_flight, memory_order_relaxed) > 1)
		return;
	clock_gettime(CLOCK_MONOTONIC, &start);
	do {
		if (poll(&p, 1, 0) != 0)
			return;
		clock_gettime(CLOCK_MONOTONIC, &now);
	} while ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) < SPIN_NS);
}

/* Runs the request in c on a connection to the bound helper. 0: c holds the answer;
 * 1: the daemon must take the call (*why says why); c's reply is dropped then. */
static int direct_run(struct p11p_call *c, const struct bound *b, unsigned nouts, int *why)
{
	int64_t deadline = p11p_deadline(b->ep->timeout_ms);
	int fd;
	CK_RV rv;

	if (c->err)
		return 0; /* a local error (bad arguments): answered as the stub would */
	fd = ep_take(b->ep);
	if (fd < 0) {
		*why = WHY_BROKEN;
		return 1;
	}
	atomic_fetch_add_explicit(&in_flight, 1, memory_order_relaxed);
	rv = p11p_send_frame(fd, c->req.data, c->req.size, deadline);
	if (rv == CKR_OK) {
		await_reply(fd);
		rv = p11p_recv_frame(fd, &c->reply, &c->reply_len, deadline);
	}
	atomic_fetch_sub_explicit(&in_flight, 1, memory_order_relaxed);
	if (rv == CKR_OK)
		p11p_reply_parse(c, nouts);
	if (rv != CKR_OK || c->err) {
		close(fd);
		*why = deadline >= 0 && p11p_now_ms() >= deadline ? WHY_TIMEOUT : WHY_BROKEN;
		if (*why == WHY_BROKEN)
			ep_broken(b->ep);
		return 1;
	}
	ep_give(b->ep, fd);
	if (is_fallback(b->ep, c->rv)) {
		*why = WHY_RETURNED;
		return 1;
	}
	return 0;
}

static void direct_begin(struct p11p_call *c, unsigned long code, unsigned nargs)
{
	memset(c, 0, sizeof *c);
	p11p_codec_begin(c, code, nargs);
}

/* Ends the sign operation left in the member session (any error but
 * CKR_BUFFER_TOO_SMALL ends it; so does a signature), before the session leaves. */
static void terminate_sign(const struct bound *b)
{
	struct p11p_call c;
	CK_BYTE *buf = malloc(TERMINATE_CAP);
	CK_ULONG len = TERMINATE_CAP;
	int why;

	if (buf == NULL)
		return;
	direct_begin(&c, P11P_FN_C_Sign, 3);
	p11p_put_ulong(&c, b->id);
	p11p_put_bytes(&c, "", 0);
	p11p_put_out_bytes(&c, buf, &len);
	(void)direct_run(&c, b, 1, &why);
	p11p_codec_end(&c);
	free(buf);
}

/* ---- binding ---- */

static void unbind(CK_SESSION_HANDLE h, int why)
{
	struct p11p_call c;
	struct sess *s;
	struct bound b = { NULL, 0 };
	int live_sign = 0;

	if (!lock())
		return;
	s = lookup(h);
	if (s != NULL && s->ep != NULL) {
		b.ep = s->ep;
		b.id = s->id;
		live_sign = s->sign == OP_DIRECT;
		s->ep = NULL;
		s->calls = 0;
		s->retry_ms = p11p_now_ms() + BIND_RETRY_MS;
	}
	unlock();
	if (b.ep == NULL)
		return;
	if (live_sign && (why == WHY_RETURNED || why == WHY_LEAVING))
		terminate_sign(&b);
	p11p_call_start(&c, P11P_FN_DIRECT_UNBIND, 2);
	p11p_put_ulong(&c, h);
	p11p_put_ulong(&c, (CK_ULONG)why);
	p11p_call_run(&c, 0);
	(void)p11p_call_finish(&c);
}

/* [name, token, id, timeout_ms, slot, [rv...]] of a DIRECT_BIND reply, into the
 * session's entry. 0, or -1 when it does not fit. */
static int take_binding(const msgpack_object *o, CK_SESSION_HANDLE h, struct bound *b)
{
	const msgpack_object *f;
	CK_ULONG id, timeout, slot;
	struct sess *s;
	struct ep *ep;
	int ret = -1;

	if (o == NULL || o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 6)
		return -1;
	f = o->via.array.ptr;
	if (f[0].type != MSGPACK_OBJECT_BIN || f[0].via.bin.size == 0 || f[0].via.bin.size > 100 ||
	    f[1].type != MSGPACK_OBJECT_BIN || f[1].via.bin.size != TOKEN ||
	    p11p_obj_ulong(&f[2], &id) != 0 || id == 0 || p11p_obj_ulong(&f[3], &timeout) != 0 ||
	    timeout == 0 || timeout > 0x7fffffffUL || p11p_obj_ulong(&f[4], &slot) != 0 ||
	    f[5].type != MSGPACK_OBJECT_ARRAY || f[5].via.array.size > MAX_FALLBACK)
		return -1;
	if (!lock())
		return -1;
	s = lookup(h);
	ep = s != NULL ? ep_get(f, (int)timeout) : NULL;
	if (ep != NULL) {
		s->ep = b->ep = ep;
		s->id = b->id = id;
		s->slot = slot;
		s->nkeys = 0;
		ret = 0;
	}
	unlock();
	return ret;
}

/* 1 and *b: the session is bound (asking the daemon when it is time); 0: not. */
static int bound_for(CK_SESSION_HANDLE h, struct bound *b, int may_bind)
{
	struct p11p_call c;
	struct sess *s;
	int ask = 0, ok = 0;

	if (disabled || !lock())
		return 0;
	s = lookup(h);
	if (s != NULL && s->ep != NULL) {
		b->ep = s->ep;
		b->id = s->id;
		ok = 1;
	} else if (s != NULL && may_bind && s->calls >= BIND_AFTER && s->sign == OP_NONE &&
		   p11p_now_ms() >= s->retry_ms) {
		s->retry_ms = p11p_now_ms() + BIND_RETRY_MS; /* one request at a time */
		ask = 1;
	}
	unlock();
	if (!ask)
		return ok;
	p11p_call_start(&c, P11P_FN_DIRECT_BIND, 1);
	p11p_put_ulong(&c, h);
	p11p_call_run(&c, 1);
	if (c.err == CKR_OK && c.rv == CKR_OK)
		ok = take_binding(p11p_next_out(&c), h, b) == 0;
	(void)p11p_call_finish(&c);
	return ok;
}

/* The member handle of key `v` for the bound session: remembered, or asked of the
 * daemon. 0, or -1 (the call goes through the daemon). */
static int member_key(CK_SESSION_HANDLE h, const struct bound *b, CK_OBJECT_HANDLE v,
		      CK_OBJECT_HANDLE *m)
{
	struct p11p_call c;
	const msgpack_object *o;
	struct sess *s;
	int found = 0;

	if (!lock())
		return -1;
	s = lookup(h);
	if (s != NULL && s->key_gen != destroy_gen) {
		s->nkeys = 0;
		s->key_gen = destroy_gen;
	}
	for (unsigned i = 0; s != NULL && i < s->nkeys && i < KEYS; i++) {
		if (s->keys[i].v == v) {
			*m = s->keys[i].m;
			found = 1;
			break;
		}
	}
	unlock();
	if (found)
		return 0;
	p11p_call_start(&c, P11P_FN_DIRECT_KEY, 2);
	p11p_put_ulong(&c, h);
	p11p_put_ulong(&c, v);
	p11p_call_run(&c, 1);
	o = c.err == CKR_OK && c.rv == CKR_OK ? p11p_next_out(&c) : NULL;
	found = o != NULL && p11p_obj_ulong(o, m) == 0;
	(void)p11p_call_finish(&c);
	if (!found)
		return -1;
	if (lock()) {
		s = lookup(h);
		if (s != NULL && s->ep == b->ep && s->id == b->id) {
			s->keys[s->nkeys % KEYS].v = v;
			s->keys[s->nkeys % KEYS].m = *m;
			s->nkeys++;
		}
		unlock();
	}
	return 0;
}

/* ---- the wrapped entry points ---- */

P11P_EXPORT CK_RV C_GenerateRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData,
				   CK_ULONG ulRandomLen)
{
	struct p11p_call c;
	struct bound b;
	CK_RV rv = p11p_enter(); /* held throughout: C_Finalize waits for this call */
	int why;

	if (rv != CKR_OK)
		return rv;
	if (RandomData != NULL && ulRandomLen <= DIRECT_MAX_DATA && bound_for(hSession, &b, 1)) {
		direct_begin(&c, P11P_FN_C_GenerateRandom, 2);
		p11p_put_ulong(&c, b.id);
		p11p_put_out_random(&c, RandomData, ulRandomLen);
		if (direct_run(&c, &b, 1, &why) == 0) {
			p11p_get_out_random(&c, RandomData, ulRandomLen);
			rv = p11p_call_finish(&c);
			p11p_leave();
			return rv;
		}
		p11p_codec_end(&c);
		unbind(hSession, why);
	}
	rv = p11p_wire_C_GenerateRandom(hSession, RandomData, ulRandomLen);
	count_call(hSession, rv);
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
			     CK_OBJECT_HANDLE hKey)
{
	struct p11p_call c;
	struct bound b;
	CK_MECHANISM_TYPE mech = 0;
	CK_OBJECT_HANDLE key = 0, mkey;
	CK_RV rv = p11p_enter();
	int why;

	if (rv != CKR_OK)
		return rv;
	/* a mechanism with a parameter goes through the daemon, which replays it */
	if (pMechanism != NULL && pMechanism->pParameter == NULL &&
	    sign_state(hSession, &mech, &key) != OP_DAEMON && bound_for(hSession, &b, 1) &&
	    member_key(hSession, &b, hKey, &mkey) == 0) {
		direct_begin(&c, P11P_FN_C_SignInit, 3);
		p11p_put_ulong(&c, b.id);
		p11p_put_mechanism(&c, pMechanism);
		p11p_put_ulong(&c, mkey);
		if (direct_run(&c, &b, 0, &why) == 0) {
			rv = p11p_call_finish(&c);
			if (rv == CKR_OK)
				set_sign(hSession, OP_DIRECT, pMechanism->mechanism, hKey);
			p11p_leave();
			return rv;
		}
		p11p_codec_end(&c);
		unbind(hSession, why);
	}
	rv = p11p_wire_C_SignInit(hSession, pMechanism, hKey);
	count_call(hSession, rv);
	if (rv == CKR_OK)
		set_sign(hSession, OP_DAEMON, 0, 0);
	p11p_leave();
	return rv;
}

/* A sign operation begun on the direct path continues through the daemon: its init
 * again there (the direct one is ended, or went with its helper). */
static CK_RV sign_to_daemon(CK_SESSION_HANDLE h, int why)
{
	CK_MECHANISM_TYPE type = 0;
	CK_OBJECT_HANDLE key = 0;
	CK_MECHANISM mech = { 0, NULL, 0 };
	CK_RV rv;

	unbind(h, why);
	if (sign_state(h, &type, &key) != OP_DIRECT)
		return CKR_OK;
	mech.mechanism = type;
	rv = p11p_wire_C_SignInit(h, &mech, key);
	set_sign(h, rv == CKR_OK ? OP_DAEMON : OP_NONE, 0, 0);
	/* its key destroyed meanwhile: the operation cannot go on, and the caller (a sign
	 * call that continues it) knows no key handle code (PKCS#11 §5.13 lists
	 * CKR_OPERATION_NOT_INITIALIZED, which the token gives here) */
	if (rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID)
		rv = CKR_OPERATION_NOT_INITIALIZED;
	return rv;
}

P11P_EXPORT CK_RV C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,
			 CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)
{
	struct p11p_call c;
	struct bound b;
	CK_MECHANISM_TYPE mech = 0;
	CK_OBJECT_HANDLE key = 0;
	CK_RV rv = p11p_enter();
	int why = WHY_LEAVING, local;

	if (rv != CKR_OK)
		return rv;
	if (sign_state(hSession, &mech, &key) == OP_DIRECT) {
		if (ulDataLen <= DIRECT_MAX_DATA && bound_for(hSession, &b, 0)) {
			direct_begin(&c, P11P_FN_C_Sign, 3);
			p11p_put_ulong(&c, b.id);
			p11p_put_bytes(&c, pData, ulDataLen);
			p11p_put_out_bytes(&c, pSignature, pulSignatureLen);
			local = c.err != CKR_OK; /* not sent: the operation is as it was */
			if (direct_run(&c, &b, 1, &why) == 0) {
				p11p_get_out_bytes(&c, pSignature, pulSignatureLen);
				rv = p11p_call_finish(&c);
				if (!local)
					sign_done(hSession, rv, pSignature);
				p11p_leave();
				return rv;
			}
			p11p_codec_end(&c);
		}
		rv = sign_to_daemon(hSession, why);
		if (rv != CKR_OK) {
			p11p_leave();
			return rv;
		}
	}
	rv = p11p_wire_C_Sign(hSession, pData, ulDataLen, pSignature, pulSignatureLen);
	count_call(hSession, rv);
	sign_done(hSession, rv, pSignature);
	p11p_leave();
	return rv;
}

/* Multi-part operations run through the daemon, which replays their updates: a sign
 * operation begun on the direct path moves there first. */
static CK_RV multi_part_on_daemon(CK_SESSION_HANDLE h)
{
	CK_MECHANISM_TYPE mech;
	CK_OBJECT_HANDLE key;

	return sign_state(h, &mech, &key) == OP_DIRECT ? sign_to_daemon(h, WHY_LEAVING) : CKR_OK;
}

P11P_EXPORT CK_RV C_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	rv = multi_part_on_daemon(hSession);
	if (rv == CKR_OK) {
		rv = p11p_wire_C_SignUpdate(hSession, pPart, ulPartLen);
		if (rv != CKR_OK)
			set_sign(hSession, OP_NONE, 0, 0);
	}
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,
			      CK_ULONG_PTR pulSignatureLen)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	rv = multi_part_on_daemon(hSession);
	if (rv == CKR_OK) {
		rv = p11p_wire_C_SignFinal(hSession, pSignature, pulSignatureLen);
		sign_done(hSession, rv, pSignature);
	}
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_CloseSession(CK_SESSION_HANDLE hSession)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	rv = p11p_wire_C_CloseSession(hSession); /* the daemon revokes the binding */
	if (lock()) {
		drop_where(is_session, hSession);
		unlock();
	}
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_CloseAllSessions(CK_SLOT_ID slotID)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	rv = p11p_wire_C_CloseAllSessions(slotID);
	if (lock()) {
		drop_where(on_slot, slotID);
		unlock();
	}
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	rv = p11p_wire_C_DestroyObject(hSession, hObject);
	if (rv == CKR_OK && lock()) {
		destroy_gen++;
		unlock();
	}
	p11p_leave();
	return rv;
}
