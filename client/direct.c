/* p11p client — the data plane's engine (see direct.h): a table of the sessions that made
 * calls of the data plane (bound or not; per operation kind where the operation runs and
 * what its replay needs), per helper listener (an endpoint) a stack of idle connections,
 * and the replay of an operation through the daemon. The table and the stacks are
 * guarded by the library's lock; the calls themselves run outside it, each on a
 * connection of its own. */
#include <errno.h>
#include <poll.h>
#include <sched.h>
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
#include "sessions.h"
#include "state.h"

#define BUCKETS 256
#define EP_IDLE 16             /* idle connections kept per endpoint */
#define MAX_FALLBACK 64
#define TOKEN 16
#define KEYS 8                 /* member handles remembered per session */
#define BIND_AFTER 3           /* data-plane calls through the daemon before asking to bind */
#define BIND_RETRY_MS 1000     /* after a refusal or an unbind */
#define END_CAP 65536          /* an output buffer that fits what ends an operation */
#define SPIN_NS 60000          /* a lone call waits this long awake for its reply */
#define LENGTHS 16             /* signature lengths remembered (length queries) */
#define INITS 16               /* operation inits remembered as answered CKR_OK */

/* Where an operation of a session runs. */
enum { OP_NONE, OP_PLANE, OP_DAEMON, OP_REPLAY /* was on the data plane: sent again first */,
       OP_LOST /* could not be sent again: its next call answers CKR_DEVICE_ERROR */ };

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
	int cpu_hint;               /* its helper follows the CPU hint (p11p_send_hinted) */
	int pairs;                  /* its helper answers a pair sent at once (p11p_send_pair) */
	int idle[EP_IDLE];
	const void *last[EP_IDLE];  /* the thread that gave each idle connection back */
	unsigned nidle;
};

/* An update the member consumed, as it is sent again through the daemon. */
struct update {
	unsigned long code;
	unsigned char *data;
	CK_ULONG len;
	int out;                    /* it has an output: its length and digest */
	CK_ULONG out_len;
	unsigned char digest[P11P_DIGEST_SIZE];
};

/* One operation kind of a session. */
struct op {
	int where;                  /* OP_* */
	int replayable;             /* (OP_PLANE, OP_REPLAY) within replay_limit */
	unsigned long init_code;
	unsigned char *mech;        /* the init's mechanism as encoded (parameter included) */
	size_t mech_len;
	int has_key;
	CK_OBJECT_HANDLE key;       /* virtual */
	struct update *ups;
	size_t nups, cap;
	uint64_t size, limit;       /* update data so far; the group's replay_limit */
	int deferred;               /* (OP_PLANE) its init not sent yet: it goes with the next
	                             * call of the operation (inits, below) */
	CK_OBJECT_HANDLE mkey;      /* deferred: the member key its init names */
	CK_RV lost_rv;              /* OP_LOST: what its next call answers (0: CKR_DEVICE_ERROR) */
};

struct sess {
	struct sess *next;
	CK_SESSION_HANDLE h;
	CK_SLOT_ID slot;
	struct ep *ep;              /* bound: its helper's endpoint; NULL: not bound */
	uint64_t id;                /* bound: what the helper knows the session by */
	uint64_t replay_limit;      /* bound: the group's */
	unsigned calls;             /* data-plane calls through the daemon since the last unbind */
	int64_t retry_ms;           /* not bound: no bind request before this */
	struct op ops[P11P_KINDS];
	struct { CK_OBJECT_HANDLE v, m; int use; } keys[KEYS];
	unsigned nkeys, key_gen;
};

static struct sess *table[BUCKETS];
static struct ep *eps;
static unsigned destroy_gen;   /* C_DestroyObject, C_Logout: remembered handles expire */
static int disabled;
static int old_daemon;         /* its binding has no replay_limit: no data plane with it */
static atomic_int in_flight;   /* data-plane calls waiting for their reply */

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
	old_daemon = 0;
}

static void op_clear(struct op *o)
{
	for (size_t i = 0; i < o->nups; i++)
		free(o->ups[i].data);
	free(o->ups);
	free(o->mech);
	memset(o, 0, sizeof *o);
}

static void sess_free(struct sess *s)
{
	for (int k = 0; k < P11P_KINDS; k++)
		op_clear(&s->ops[k]);
	free(s);
}

static void lengths_reset(void);
static void inits_reset(void);

void p11p_direct_reset(void)
{
	lengths_reset();
	inits_reset();
	for (unsigned i = 0; i < BUCKETS; i++) {
		while (table[i] != NULL) {
			struct sess *s = table[i];

			table[i] = s->next;
			sess_free(s);
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

static struct sess *lookup_or_add(CK_SESSION_HANDLE h)
{
	struct sess *s = lookup(h);

	if (s == NULL && (s = calloc(1, sizeof *s)) != NULL) {
		s->h = h;
		s->next = table[(h ^ (h >> 8)) % BUCKETS];
		table[(h ^ (h >> 8)) % BUCKETS] = s;
	}
	return s;
}

static void drop_where(int (*match)(const struct sess *, CK_ULONG), CK_ULONG arg)
{
	for (unsigned i = 0; i < BUCKETS; i++) {
		struct sess **p = &table[i];

		while (*p != NULL) {
			if (match(*p, arg)) {
				struct sess *s = *p;

				*p = s->next;
				sess_free(s);
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

void p11p_plane_forget(CK_SESSION_HANDLE h)
{
	if (lock()) {
		drop_where(is_session, h);
		unlock();
	}
}

void p11p_plane_forget_slot(CK_SLOT_ID slot)
{
	if (lock()) {
		drop_where(on_slot, slot);
		unlock();
	}
}

void p11p_plane_destroyed(void)
{
	if (lock()) {
		destroy_gen++;
		unlock();
	}
}

/* The daemon's answer says the session exists: it is counted (and made known). */
void p11p_plane_counted(CK_SESSION_HANDLE h, CK_RV rv)
{
	struct sess *s;

	if (disabled || rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
	    rv == CKR_CRYPTOKI_NOT_INITIALIZED || rv == CKR_DEVICE_ERROR || !lock())
		return;
	s = lookup_or_add(h);
	if (s != NULL)
		s->calls++;
	unlock();
}

static int op_where(CK_SESSION_HANDLE h, int kind)
{
	struct sess *s;
	int where = OP_NONE;

	if (!lock())
		return OP_NONE;
	s = lookup(h);
	if (s != NULL)
		where = s->ops[kind].where;
	unlock();
	return where;
}

/* ---- signature lengths: a length query answered as the member answered it before ----
 *
 * A signature's length depends on the key and the mechanism, not on the data (PKCS#11
 * signatures are fixed-size: RSA, ECDSA's r|s, EdDSA, MACs), so the answer to a length
 * query of C_Sign or C_SignFinal on the data plane is remembered, keyed by the
 * operation's init (code, mechanism with its parameter, virtual key), the call and its
 * data length, and the next such query is answered here: the two-call convention
 * (length, then signature) costs one round trip. Under the lock; a C_DestroyObject or
 * C_Logout (destroy_gen) expires them. */
static struct length {
	unsigned long init_code, code;
	unsigned char *mech;
	size_t mech_len;
	CK_OBJECT_HANDLE key;
	CK_ULONG in_len, out_len;
	unsigned gen;
} lengths[LENGTHS];
static unsigned next_length;

static int is_length_query(const struct p11p_op_shape *sh, const struct p11p_op_args *a)
{
	return sh->kind == P11P_K_SIGN && sh->out && a->out == NULL && a->out_len != NULL &&
	       (sh->role == P11P_R_FINAL ||
		(sh->role == P11P_R_ONESHOT && (a->in[0] != NULL || a->in_len[0] == 0)));
}

static struct length *length_of(const struct op *o, const struct p11p_op_shape *sh,
				const struct p11p_op_args *a)
{
	CK_ULONG in_len = sh->role == P11P_R_ONESHOT ? a->in_len[0] : 0;

	for (unsigned i = 0; i < LENGTHS; i++) {
		struct length *l = &lengths[i];

		if (l->mech != NULL && l->gen == destroy_gen && l->code == sh->code &&
		    l->init_code == o->init_code && l->key == o->key && l->in_len == in_len &&
		    l->mech_len == o->mech_len && memcmp(l->mech, o->mech, o->mech_len) == 0)
			return l;
	}
	return NULL;
}

/* A length query of an operation on the data plane answered from what the member said
 * (1), or not (0). */
static int length_known(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh,
			const struct p11p_op_args *a)
{
	const struct sess *s;
	const struct length *l = NULL;

	if (!is_length_query(sh, a) || !lock())
		return 0;
	s = lookup(h);
	if (s != NULL && s->ops[sh->kind].where == OP_PLANE && s->ops[sh->kind].mech != NULL)
		l = length_of(&s->ops[sh->kind], sh, a);
	if (l != NULL)
		*a->out_len = l->out_len;
	unlock();
	return l != NULL;
}

/* The member answered a length query of an operation on the data plane (under the lock). */
static void length_learnt(const struct op *o, const struct p11p_op_shape *sh,
			  const struct p11p_op_args *a)
{
	struct length *l;
	unsigned char *mech;

	if (o->where != OP_PLANE || o->mech == NULL || length_of(o, sh, a) != NULL ||
	    (mech = malloc(o->mech_len ? o->mech_len : 1)) == NULL)
		return;
	l = &lengths[next_length++ % LENGTHS];
	free(l->mech);
	memcpy(mech, o->mech, o->mech_len);
	*l = (struct length){ o->init_code, sh->code, mech, o->mech_len, o->key,
			      sh->role == P11P_R_ONESHOT ? a->in_len[0] : 0, *a->out_len, destroy_gen };
}

static void lengths_reset(void)
{
	for (unsigned i = 0; i < LENGTHS; i++)
		free(lengths[i].mech);
	memset(lengths, 0, sizeof lengths);
	next_length = 0;
}

/* ---- deferred inits: an init answered as before goes with the next call ----
 *
 * An operation's init on the data plane whose arguments (code, mechanism with its
 * parameter, virtual key) the member answered CKR_OK on the data plane before, with no
 * C_DestroyObject or C_Logout of this process since (destroy_gen), is answered CKR_OK
 * here, and sent with the operation's next call in one send to a helper that answers
 * pairs (p11p_send_pair; fast.c): C_SignInit + C_Sign cost one round trip. Should the
 * module refuse it after all (its key destroyed by another process, its CKA_SIGN set
 * false since), the next call answers the init's error and the operation is over, as a
 * failed init leaves it; that entry is forgotten. Any other call of the session that
 * needs the operation where it runs sends the init first (send_deferred, move_ops:
 * replay). Under the lock. */
static struct init {
	unsigned long code;
	unsigned char *mech;
	size_t mech_len;
	CK_OBJECT_HANDLE key;
	unsigned gen;
} inits[INITS];
static unsigned next_init;

static struct init *init_of(unsigned long code, const unsigned char *mech, size_t len,
			    CK_OBJECT_HANDLE key)
{
	for (unsigned i = 0; i < INITS; i++) {
		struct init *e = &inits[i];

		if (e->mech != NULL && e->code == code && e->key == key && e->mech_len == len &&
		    memcmp(e->mech, mech, len) == 0)
			return e;
	}
	return NULL;
}

static void init_learnt(unsigned long code, const unsigned char *mech, size_t len,
			CK_OBJECT_HANDLE key)
{
	struct init *e = init_of(code, mech, len, key);

	if (e == NULL) {
		e = &inits[next_init];
		next_init = (next_init + 1) % INITS;
		free(e->mech);
		memset(e, 0, sizeof *e);
		if ((e->mech = malloc(len ? len : 1)) == NULL)
			return;
		memcpy(e->mech, mech, len);
		e->mech_len = len;
		e->code = code;
		e->key = key;
	}
	e->gen = destroy_gen;
}

static void init_forget(unsigned long code, const unsigned char *mech, size_t len,
			CK_OBJECT_HANDLE key)
{
	struct init *e = init_of(code, mech, len, key);

	if (e != NULL) {
		free(e->mech);
		memset(e, 0, sizeof *e);
	}
}

static void inits_reset(void)
{
	for (unsigned i = 0; i < INITS; i++)
		free(inits[i].mech);
	memset(inits, 0, sizeof inits);
	next_init = 0;
}

static int all_idle(const struct sess *s)
{
	for (int k = 0; k < P11P_KINDS; k++)
		if (s->ops[k].where != OP_NONE)
			return 0;
	return 1;
}

/* ---- endpoints and their connections ---- */

static int is_fallback(const struct ep *ep, CK_RV rv)
{
	for (unsigned i = 0; i < ep->nfallback; i++)
		if (ep->fallback[i] == rv)
			return 1;
	return 0;
}

static __thread char me;      /* its address tells this thread from the others */

/* A connection to the endpoint: an idle one, or a new one that has sent the token. */
static int ep_take(struct ep *ep)
{
	struct sockaddr_un addr;
	int fd = -1;

	if (lock()) {
		if (ep->nidle > 0) {
			unsigned i = ep->nidle - 1;

			/* the one this thread used last, when idle: a client thread keeps talking
			 * to one helper thread (a connection is served by one), which the
			 * scheduler then keeps near it */
			for (unsigned k = 0; k < ep->nidle; k++)
				if (ep->last[k] == &me) {
					i = k;
					break;
				}
			fd = ep->idle[i];
			ep->nidle--;
			ep->idle[i] = ep->idle[ep->nidle];
			ep->last[i] = ep->last[ep->nidle];
		}
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
			ep->last[ep->nidle] = &me;
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
static struct ep *ep_get(const msgpack_object *f, int timeout_ms, int cpu_hint, int pairs)
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
	ep->cpu_hint = cpu_hint;
	ep->pairs = pairs;
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

/* ---- one call on the data plane ---- */

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

int p11p_plane_run(struct p11p_call *c, const struct p11p_bound *b, unsigned nouts, int *why)
{
	struct ep *ep = b->ep;
	int64_t deadline = p11p_deadline(ep->timeout_ms);
	int fd, lone;
	CK_RV rv;

	if (c->err)
		return 0; /* a local error (bad arguments): answered as the stub would */
	fd = ep_take(ep);
	if (fd < 0) {
		*why = P11P_WHY_BROKEN;
		return 1;
	}
	/* with other calls in flight this thread blocks for the reply (await_reply): the
	 * helper thread is asked onto its CPU (helper/fast.c, follow). A lone call watches
	 * its socket instead, and the helper thread had better run on another CPU. */
	lone = atomic_fetch_add_explicit(&in_flight, 1, memory_order_relaxed) == 0;
	rv = ep->cpu_hint ? p11p_send_hinted(fd, c->req.data, c->req.size, deadline,
					     lone ? -1 : sched_getcpu())
			  : p11p_send_frame(fd, c->req.data, c->req.size, deadline);
	if (rv == CKR_OK) {
		await_reply(fd);
		rv = p11p_recv_frame(fd, &c->reply, &c->reply_len, deadline);
	}
	atomic_fetch_sub_explicit(&in_flight, 1, memory_order_relaxed);
	if (rv == CKR_OK)
		p11p_reply_parse(c, nouts);
	if (rv != CKR_OK || c->err) {
		close(fd);
		*why = deadline >= 0 && p11p_now_ms() >= deadline ? P11P_WHY_TIMEOUT : P11P_WHY_BROKEN;
		if (*why == P11P_WHY_BROKEN)
			ep_broken(ep);
		return 1;
	}
	ep_give(ep, fd);
	if (is_fallback(ep, c->rv)) {
		*why = P11P_WHY_RETURNED;
		return 1;
	}
	return 0;
}

/* An operation's deferred init `ci` and its next call `c` in one send, their replies read
 * at one wake-up (to a helper that answers pairs). 0: both replies parsed (what they
 * answer is the caller's to read: a fallback code included); 1: the connection failed
 * (*why). */
static int plane_run_pair(struct p11p_call *ci, struct p11p_call *c, const struct p11p_bound *b,
			  unsigned nouts, int *why)
{
	struct ep *ep = b->ep;
	int64_t deadline = p11p_deadline(ep->timeout_ms);
	int fd, lone;
	CK_RV rv;

	fd = ep_take(ep);
	if (fd < 0) {
		*why = P11P_WHY_BROKEN;
		return 1;
	}
	lone = atomic_fetch_add_explicit(&in_flight, 1, memory_order_relaxed) == 0;
	rv = p11p_send_pair(fd, ci->req.data, ci->req.size, c->req.data, c->req.size, deadline,
			    ep->cpu_hint && !lone ? sched_getcpu() : -1);
	if (rv == CKR_OK) {
		await_reply(fd);
		rv = p11p_recv_two(fd, &ci->reply, &ci->reply_len, &c->reply, &c->reply_len,
				   deadline);
	}
	atomic_fetch_sub_explicit(&in_flight, 1, memory_order_relaxed);
	if (rv == CKR_OK) {
		p11p_reply_parse(ci, 0);
		p11p_reply_parse(c, nouts);
	}
	if (rv != CKR_OK || ci->err || c->err) {
		close(fd);
		*why = deadline >= 0 && p11p_now_ms() >= deadline ? P11P_WHY_TIMEOUT : P11P_WHY_BROKEN;
		if (*why == P11P_WHY_BROKEN)
			ep_broken(ep);
		return 1;
	}
	ep_give(ep, fd);
	return 0;
}

void p11p_plane_begin(struct p11p_call *c, unsigned long code, unsigned nargs)
{
	memset(c, 0, sizeof *c);
	p11p_codec_begin(c, code, nargs);
}

/* ---- what ends an operation (as daemon/bind.py STALE_ENDS) ---- */

/* Per kind, up to three requests after the session: e an empty byte string, c a buffer's
 * capacity, z 64 zero bytes (a signature that cannot verify; whole blocks of ciphertext:
 * SoftHSM2 keeps a CBC-PAD decryption without data through an empty update and a final). */
static const struct { unsigned long code; const char *args; } ENDS[P11P_KINDS][3] = {
	[P11P_K_ENCRYPT] = { { P11P_FN_C_EncryptUpdate, "ec" }, { P11P_FN_C_EncryptFinal, "c" } },
	[P11P_K_DECRYPT] = { { P11P_FN_C_DecryptUpdate, "ec" }, { P11P_FN_C_DecryptUpdate, "zc" },
			     { P11P_FN_C_DecryptFinal, "c" } },
	[P11P_K_DIGEST] = { { P11P_FN_C_DigestUpdate, "e" }, { P11P_FN_C_DigestFinal, "c" } },
	[P11P_K_SIGN] = { { P11P_FN_C_SignUpdate, "e" }, { P11P_FN_C_SignFinal, "c" } },
	[P11P_K_VERIFY] = { { P11P_FN_C_VerifyUpdate, "e" }, { P11P_FN_C_VerifyFinal, "z" } },
	[P11P_K_SIGN_RECOVER] = { { P11P_FN_C_SignRecover, "ec" }, { 0, NULL } },
	[P11P_K_VERIFY_RECOVER] = { { P11P_FN_C_VerifyRecover, "zc" }, { 0, NULL } },
};

/* Ends the operation of `kind` where it runs: on the helper (b) or through the daemon
 * (b NULL, session h). Best effort: whatever is answered, the operation is over. */
static void end_operation(CK_SESSION_HANDLE h, const struct p11p_bound *b, int kind)
{
	static const unsigned char zero[64];

	for (int i = 0; i < 3 && ENDS[kind][i].args != NULL; i++) {
		const char *args = ENDS[kind][i].args;
		unsigned nargs = 1 + (unsigned)strlen(args), nouts = strchr(args, 'c') != NULL;
		struct p11p_call c;
		int why;

		if (b != NULL) {
			p11p_plane_begin(&c, ENDS[kind][i].code, nargs);
			p11p_put_ulong(&c, b->id);
		} else {
			p11p_call_start(&c, ENDS[kind][i].code, nargs);
			p11p_put_session(&c, h);
		}
		for (const char *a = args; *a != '\0'; a++) {
			if (*a == 'e')
				p11p_put_bin(&c, "", 0);
			else if (*a == 'z')
				p11p_put_bin(&c, zero, sizeof zero);
			else
				p11p_put_ulong(&c, END_CAP);
		}
		if (b != NULL)
			(void)p11p_plane_run(&c, b, nouts, &why);
		else
			p11p_call_run(&c, nouts);
		(void)p11p_call_finish(&c);
	}
}

/* ---- binding ---- */

void p11p_plane_unbind(CK_SESSION_HANDLE h, int why)
{
	struct p11p_call c;
	struct sess *s;
	struct p11p_bound b = { NULL, 0, 0 };
	int plane[P11P_KINDS] = { 0 };

	if (!lock())
		return;
	s = lookup(h);
	if (s != NULL && s->ep != NULL) {
		b.ep = s->ep;
		b.id = s->id;
		s->ep = NULL;
		s->calls = 0;
		s->retry_ms = p11p_now_ms() + BIND_RETRY_MS;
		/* its operations on the data plane are sent again through the daemon at their
		 * next call */
		for (int k = 0; k < P11P_KINDS; k++) {
			if (s->ops[k].where == OP_PLANE) {
				s->ops[k].where = OP_REPLAY;
				plane[k] = !s->ops[k].deferred; /* a deferred one never ran */
			}
		}
	}
	unlock();
	if (b.ep == NULL)
		return;
	/* what the member session still runs would meet their replay there */
	if (why == P11P_WHY_RETURNED || why == P11P_WHY_LEAVING)
		for (int k = 0; k < P11P_KINDS; k++)
			if (plane[k])
				end_operation(h, &b, k);
	p11p_call_start(&c, P11P_FN_DIRECT_UNBIND, 2);
	p11p_put_session(&c, h);
	p11p_put_ulong(&c, (CK_ULONG)why);
	p11p_call_run(&c, 0);
	(void)p11p_call_finish(&c);
}

/* [name, token, id, timeout_ms, slot, [rv...], replay_limit[, cpu_hint[, pairs]]] of a
 * DIRECT_BIND reply, into the session's entry. 0, or -1 when it does not fit. */
static int take_binding(const msgpack_object *o, CK_SESSION_HANDLE h, struct p11p_bound *b)
{
	const msgpack_object *f;
	CK_ULONG id, timeout, slot, limit;
	struct sess *s;
	struct ep *ep;
	int ret = -1, hint = 0, pairs = 0;

	if (o == NULL || o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 7 ||
	    o->via.array.size > 9)
		return -1;
	f = o->via.array.ptr;
	if (o->via.array.size >= 8) {  /* the hello agreed cpu_hint */
		if (f[7].type != MSGPACK_OBJECT_BOOLEAN)
			return -1;
		hint = f[7].via.boolean;
	}
	if (o->via.array.size == 9) {  /* ... and plane_pairs */
		if (f[8].type != MSGPACK_OBJECT_BOOLEAN)
			return -1;
		pairs = f[8].via.boolean;
	}
	if (f[0].type != MSGPACK_OBJECT_BIN || f[0].via.bin.size == 0 || f[0].via.bin.size > 100 ||
	    f[1].type != MSGPACK_OBJECT_BIN || f[1].via.bin.size != TOKEN ||
	    p11p_obj_ulong(&f[2], &id) != 0 || id == 0 || p11p_obj_ulong(&f[3], &timeout) != 0 ||
	    timeout == 0 || timeout > 0x7fffffffUL || p11p_obj_ulong(&f[4], &slot) != 0 ||
	    f[5].type != MSGPACK_OBJECT_ARRAY || f[5].via.array.size > MAX_FALLBACK ||
	    p11p_obj_ulong(&f[6], &limit) != 0)
		return -1;
	if (!lock())
		return -1;
	s = lookup(h);
	ep = s != NULL ? ep_get(f, (int)timeout, hint, pairs) : NULL;
	if (ep != NULL) {
		s->ep = b->ep = ep;
		s->id = b->id = id;
		s->slot = b->slot = slot;
		s->replay_limit = limit;
		s->nkeys = 0;
		ret = 0;
	}
	unlock();
	return ret;
}

int p11p_plane_bound(CK_SESSION_HANDLE h, struct p11p_bound *b, int may_bind)
{
	struct p11p_call c;
	const msgpack_object *o = NULL;
	struct sess *s;
	int ask = 0, ok = 0, old = 0;

	if (disabled || !lock())
		return 0;
	s = lookup(h);
	if (s != NULL && s->ep != NULL) {
		b->ep = s->ep;
		b->id = s->id;
		b->slot = s->slot;
		ok = 1;
	} else if (s != NULL && may_bind && !old_daemon && s->calls >= BIND_AFTER && all_idle(s) &&
		   p11p_now_ms() >= s->retry_ms) {
		s->retry_ms = p11p_now_ms() + BIND_RETRY_MS; /* one request at a time */
		ask = 1;
	}
	unlock();
	if (!ask)
		return ok;
	p11p_call_start(&c, P11P_FN_DIRECT_BIND, 1);
	p11p_put_session(&c, h);
	p11p_call_run(&c, 1);
	if (c.err == CKR_OK && c.rv == CKR_OK) {
		o = p11p_next_out(&c);
		ok = take_binding(o, h, b) == 0;
		/* a daemon without the data plane's replay_limit (its helpers serve three
		 * calls): the binding ends, and this library asks it no more */
		old = !ok && o != NULL && o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size == 6;
	}
	(void)p11p_call_finish(&c);
	if (old) {
		if (lock()) {
			old_daemon = 1;
			unlock();
		}
		p11p_call_start(&c, P11P_FN_DIRECT_UNBIND, 2);
		p11p_put_session(&c, h);
		p11p_put_ulong(&c, P11P_WHY_LEAVING);
		p11p_call_run(&c, 0);
		(void)p11p_call_finish(&c);
	}
	return ok;
}

int p11p_plane_object(CK_SESSION_HANDLE h, const struct p11p_bound *b, CK_OBJECT_HANDLE v,
		      CK_OBJECT_HANDLE *m, int use)
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
		if (s->keys[i].v == v && s->keys[i].use >= use) {
			*m = s->keys[i].m;
			found = 1;
			break;
		}
	}
	unlock();
	if (found)
		return 0;
	p11p_call_start(&c, use ? P11P_FN_DIRECT_KEY : P11P_FN_DIRECT_OBJECT, 2);
	p11p_put_session(&c, h);
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
			unsigned i = 0;

			while (i < s->nkeys && i < KEYS && s->keys[i].v != v)
				i++;
			if (i >= s->nkeys || i >= KEYS)
				i = s->nkeys++ % KEYS;
			s->keys[i].v = v;
			s->keys[i].m = *m;
			s->keys[i].use = use;
		}
		unlock();
	}
	return 0;
}

/* ---- operations: what replay needs ---- */

/* The mechanism as the request encodes it, malloc'd (NULL when it cannot be sent). */
static unsigned char *encode_mechanism(const CK_MECHANISM *m, size_t *len)
{
	struct p11p_call t;
	unsigned char *out = NULL;
	size_t start;

	p11p_plane_begin(&t, 0, 0);
	start = t.req.size;
	p11p_put_mechanism(&t, m);
	if (!t.err && (out = malloc(t.req.size - start)) != NULL) {
		*len = t.req.size - start;
		memcpy(out, t.req.data + start, *len);
	}
	p11p_codec_end(&t);
	return out;
}

/* Under the lock: an update the member consumed, kept (or the operation is over the
 * limit: nothing is kept, and it cannot be sent again). */
static void keep_update(struct op *o, const struct p11p_op_shape *sh, const struct p11p_op_args *a)
{
	struct update *u;
	CK_ULONG len = sh->nbytes > 0 && a->in[0] != NULL ? a->in_len[0] : 0;

	if (!o->replayable)
		return;
	o->size += len;
	if (o->size > o->limit)
		goto over;
	if (o->nups == o->cap) {
		size_t cap = o->cap ? 2 * o->cap : 8;
		struct update *ups = realloc(o->ups, cap * sizeof *ups);

		if (ups == NULL)
			goto over;
		o->ups = ups;
		o->cap = cap;
	}
	u = &o->ups[o->nups];
	memset(u, 0, sizeof *u);
	u->code = sh->code;
	u->len = len;
	if ((u->data = malloc(len ? len : 1)) == NULL)
		goto over;
	if (len > 0)
		memcpy(u->data, a->in[0], len);
	if (sh->out) {
		u->out = 1;
		u->out_len = *a->out_len;
		p11p_digest16(a->out, *a->out_len, u->digest);
	}
	o->nups++;
	return;
over:
	for (size_t i = 0; i < o->nups; i++)
		free(o->ups[i].data);
	free(o->ups);
	o->ups = NULL;
	o->nups = o->cap = 0;
	o->replayable = 0;
}

/* After a call of an operation answered rv (on the data plane when `plane`): PKCS#11
 * §5.2. An init that succeeds starts the operation where it ran; an update the member
 * consumed continues it (kept for replay on the data plane); a length query or
 * CKR_BUFFER_TOO_SMALL changes nothing; any other outcome of an update, a final or a
 * one-part call ends it. `mech`: the init's encoded mechanism, taken over. */
static void after_call(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh,
		       const struct p11p_op_args *a, CK_RV rv, int plane,
		       unsigned char *mech, size_t mech_len)
{
	struct sess *s;
	struct op *o;

	if (!lock()) {
		free(mech);
		return;
	}
	if (sh->role == P11P_R_INIT && plane && mech != NULL) {
		if (rv == CKR_OK)
			init_learnt(sh->code, mech, mech_len, sh->key ? a->key : 0);
		else
			init_forget(sh->code, mech, mech_len, sh->key ? a->key : 0);
	}
	s = sh->role == P11P_R_INIT && rv == CKR_OK ? lookup_or_add(h) : lookup(h);
	if (s == NULL) {
		unlock();
		free(mech);
		return;
	}
	o = &s->ops[sh->kind];
	switch (sh->role) {
	case P11P_R_INIT:
		if (rv != CKR_OK)
			break;
		op_clear(o);
		o->where = plane ? OP_PLANE : OP_DAEMON;
		if (plane) {
			o->replayable = mech != NULL;
			o->init_code = sh->code;
			o->mech = mech;
			o->mech_len = mech_len;
			mech = NULL;
			o->has_key = sh->key;
			o->key = a->key;
			o->limit = s->replay_limit;
		}
		break;
	case P11P_R_UPDATE:
		if (rv == CKR_OK && (!sh->out || a->out != NULL)) {
			if (o->where == OP_PLANE && plane)
				keep_update(o, sh, a);
		} else if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL && !sh->opaque) {
			op_clear(o); /* a refused C_DigestKey leaves the digest (daemon/policy.py) */
		}
		break;
	default:
		if (rv == CKR_OK && plane && is_length_query(sh, a))
			length_learnt(o, sh, a);
		if (rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && sh->out && a->out == NULL))
			break;
		op_clear(o);
	}
	unlock();
	free(mech);
}

static int hand_over(CK_SESSION_HANDLE h, int kind, const struct op *o);

/* The operation of `kind`, begun on the data plane and unbound since, goes to the daemon:
 * handed over as it runs when its member session still runs it (hand_over: the daemon
 * ended the binding itself), else sent again: its init and the updates the member
 * consumed, their outputs checked. CKR_OK: it runs through the daemon now; else it is
 * lost (over replay_limit, refused, or other outputs): CKR_DEVICE_ERROR, as the daemon
 * answers a lost one. */
static void init_refused(const struct op *o)
{
	if (lock()) { /* it is not deferred again */
		init_forget(o->init_code, o->mech, o->mech_len, o->key);
		unlock();
	}
}

static CK_RV replay(CK_SESSION_HANDLE h, int kind)
{
	struct p11p_call c;
	struct sess *s;
	struct op o;
	CK_RV rv = CKR_DEVICE_ERROR, refused = CKR_OK;
	int started = 0, handed;

	memset(&o, 0, sizeof o);
	if (!lock())
		return CKR_GENERAL_ERROR;
	s = lookup(h);
	if (s != NULL && s->ops[kind].where == OP_REPLAY) {
		o = s->ops[kind];
		memset(&s->ops[kind], 0, sizeof s->ops[kind]);
	}
	unlock();
	if (o.where != OP_REPLAY)
		return CKR_OK; /* moved meanwhile */
	/* still running where it ran? (a deferred init never ran: it is sent) */
	handed = o.deferred ? 0 : hand_over(h, kind, &o);
	if (handed != 0) {
		rv = handed > 0 ? CKR_OK : CKR_DEVICE_ERROR;
		goto out;
	}
	if (!o.replayable)
		goto out;
	p11p_call_start(&c, o.init_code, o.has_key ? 3 : 2);
	p11p_put_session(&c, h);
	p11p_put_raw(&c, o.mech, o.mech_len);
	if (o.has_key)
		p11p_put_ulong(&c, o.key);
	p11p_call_run(&c, 0);
	if ((refused = p11p_call_finish(&c)) != CKR_OK) {
		if (!o.deferred) /* a deferred init refused: the operation never began */
			refused = CKR_OK;
		else
			init_refused(&o);
		goto out;
	}
	started = 1;
	for (size_t i = 0; i < o.nups; i++) {
		const struct update *u = &o.ups[i];
		const msgpack_object *out;
		unsigned char d[P11P_DIGEST_SIZE];
		int same;

		p11p_call_start(&c, u->code, u->out ? 3 : 2);
		p11p_put_session(&c, h);
		p11p_put_bin(&c, u->data, u->len);
		if (u->out)
			p11p_put_ulong(&c, u->out_len + 256);
		p11p_call_run(&c, u->out ? 1 : 0);
		same = c.err == CKR_OK && c.rv == CKR_OK;
		if (same && u->out) {
			out = p11p_next_out(&c);
			same = out != NULL && out->type == MSGPACK_OBJECT_BIN;
			if (same) {
				p11p_digest16((const unsigned char *)out->via.bin.ptr,
					      out->via.bin.size, d);
				same = out->via.bin.size == u->out_len &&
				       memcmp(d, u->digest, sizeof d) == 0;
			}
		}
		(void)p11p_call_finish(&c);
		if (!same)
			goto out;
	}
	rv = CKR_OK;
out:
	if (rv != CKR_OK && started)
		end_operation(h, NULL, kind); /* the daemon's part of it ends too */
	if (lock()) {
		s = lookup(h);
		if (s != NULL) {
			s->ops[kind].where = rv == CKR_OK ? OP_DAEMON : OP_LOST;
			s->ops[kind].lost_rv = refused;
		}
		unlock();
	}
	op_clear(&o);
	return rv;
}

/* ---- one operation call ---- */

/* session: the virtual session (to the daemon: a session of the library's is opened
 * there first), or the binding's id (to the helper) */
static void put_call(struct p11p_call *c, const struct p11p_op_shape *sh, CK_ULONG session,
		     CK_OBJECT_HANDLE key, const struct p11p_op_args *a, int to_daemon)
{
	if (to_daemon)
		p11p_put_session(c, session);
	else
		p11p_put_ulong(c, session);
	if (sh->mech)
		p11p_put_mechanism(c, a->mech);
	if (sh->key)
		p11p_put_ulong(c, key);
	for (int i = 0; i < sh->nbytes; i++)
		p11p_put_bytes(c, a->in[i], a->in_len[i]);
	if (sh->out)
		p11p_put_out_bytes(c, a->out, a->out_len);
}

static unsigned nargs_of(const struct p11p_op_shape *sh)
{
	return 1u + (unsigned)(sh->mech + sh->key + sh->nbytes + sh->out);
}

/* An init the member answered CKR_OK before (inits) is answered CKR_OK here and kept to
 * go with the operation's next call: 1 (`mech` taken), or 0. */
static int defer(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh, const struct p11p_op_args *a,
		 CK_OBJECT_HANDLE mkey, unsigned char *mech, size_t mech_len)
{
	CK_OBJECT_HANDLE key = sh->key ? a->key : 0;
	const struct init *e;
	struct sess *s;
	struct op *o;
	int done = 0;

	if (!lock())
		return 0;
	e = init_of(sh->code, mech, mech_len, key);
	s = e != NULL && e->gen == destroy_gen ? lookup(h) : NULL;
	if (s != NULL && s->ep != NULL && s->ops[sh->kind].where == OP_NONE) {
		o = &s->ops[sh->kind];
		op_clear(o);
		o->where = OP_PLANE;
		o->replayable = 1;
		o->init_code = sh->code;
		o->mech = mech;
		o->mech_len = mech_len;
		o->has_key = sh->key;
		o->key = key;
		o->limit = s->replay_limit;
		o->deferred = 1;
		o->mkey = mkey;
		done = 1;
	}
	unlock();
	return done;
}

/* The deferred init of an operation, copied out (d->mech malloc'd): 1, or 0 when none. */
struct deferred {
	unsigned long code;
	unsigned char *mech;
	size_t mech_len;
	int has_key;
	CK_OBJECT_HANDLE key, mkey;
};

static int take_deferred(CK_SESSION_HANDLE h, int kind, struct deferred *d)
{
	const struct op *o;
	struct sess *s;
	int found = 0;

	if (!lock())
		return 0;
	s = lookup(h);
	o = s != NULL ? &s->ops[kind] : NULL;
	if (o != NULL && o->where == OP_PLANE && o->deferred &&
	    (d->mech = malloc(o->mech_len ? o->mech_len : 1)) != NULL) {
		memcpy(d->mech, o->mech, o->mech_len);
		d->mech_len = o->mech_len;
		d->code = o->init_code;
		d->has_key = o->has_key;
		d->key = o->key;
		d->mkey = o->mkey;
		found = 1;
	}
	unlock();
	return found;
}

/* What the member answered the deferred init `d` of `kind`: CKR_OK, it runs there now;
 * else the operation is over (and the init is not deferred again). */
static void deferred_answered(CK_SESSION_HANDLE h, int kind, const struct deferred *d, CK_RV rv)
{
	struct sess *s;

	if (!lock())
		return;
	if (rv != CKR_OK)
		init_forget(d->code, d->mech, d->mech_len, d->key);
	s = lookup(h);
	if (s != NULL && s->ops[kind].where == OP_PLANE && s->ops[kind].deferred) {
		if (rv == CKR_OK)
			s->ops[kind].deferred = 0;
		else
			op_clear(&s->ops[kind]);
	}
	unlock();
}

static void put_init(struct p11p_call *ci, const struct p11p_bound *b, const struct deferred *d)
{
	p11p_plane_begin(ci, d->code, d->has_key ? 3 : 2);
	p11p_put_ulong(ci, b->id);
	p11p_put_raw(ci, d->mech, d->mech_len);
	if (d->has_key)
		p11p_put_ulong(ci, d->mkey);
}

/* The call `c` (of shape sh) with its operation's deferred init `d`, in one send: as
 * on_plane answers. The init refused: the call's answer is the init's. */
static int run_deferred(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh,
			const struct p11p_op_args *a, const struct p11p_bound *b,
			struct p11p_call *c, const struct deferred *d, CK_RV *rv)
{
	struct p11p_call ci;
	CK_RV init;
	int why = P11P_WHY_LEAVING;

	put_init(&ci, b, d);
	if (ci.err != CKR_OK || plane_run_pair(&ci, c, b, (unsigned)sh->out, &why) != 0) {
		p11p_codec_end(&ci);
		p11p_codec_end(c);
		p11p_plane_unbind(h, why); /* it is sent again through the daemon (replay) */
		return 1;
	}
	if (is_fallback(b->ep, ci.rv)) {
		p11p_codec_end(&ci);
		p11p_codec_end(c);
		p11p_plane_unbind(h, P11P_WHY_RETURNED);
		return 1;
	}
	init = p11p_call_finish(&ci);
	deferred_answered(h, sh->kind, d, init);
	if (init != CKR_OK) {
		p11p_codec_end(c);
		*rv = init;
		return 0;
	}
	if (is_fallback(b->ep, c->rv)) {
		p11p_codec_end(c);
		p11p_plane_unbind(h, P11P_WHY_RETURNED);
		return 1;
	}
	if (sh->out)
		p11p_get_out_bytes(c, a->out, a->out_len);
	*rv = p11p_call_finish(c);
	after_call(h, sh, a, *rv, 1, NULL, 0);
	return 0;
}

/* An init of `kind` while its deferred one waits: that one is sent first, alone (the
 * member answers the new one as it would beside it). */
static void send_deferred(CK_SESSION_HANDLE h, int kind)
{
	struct p11p_call ci;
	struct p11p_bound b;
	struct deferred d;
	int why;

	if (!p11p_plane_bound(h, &b, 0) || !take_deferred(h, kind, &d))
		return;
	put_init(&ci, &b, &d);
	if (ci.err != CKR_OK || p11p_plane_run(&ci, &b, 0, &why) != 0) {
		p11p_codec_end(&ci);
		p11p_plane_unbind(h, ci.err != CKR_OK ? P11P_WHY_LEAVING : why);
	} else {
		deferred_answered(h, kind, &d, p11p_call_finish(&ci));
	}
	free(d.mech);
}

/* 0: answered on the data plane (*rv); 1: not (unbound there when it was tried). */
static int on_plane(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh,
		    const struct p11p_op_args *a, int where, CK_RV *rv)
{
	struct p11p_call c;
	struct p11p_bound b;
	struct deferred d;
	CK_OBJECT_HANDLE mkey = 0;
	unsigned char *mech = NULL;
	size_t mech_len = 0, size = 0;
	int why, local;

	for (int i = 0; i < sh->nbytes; i++)
		size += a->in[i] != NULL ? a->in_len[i] : 0;
	if (sh->opaque || size > P11P_PLANE_MAX_DATA) {
		if (where == OP_PLANE)
			p11p_plane_unbind(h, P11P_WHY_LEAVING);
		return 1;
	}
	if (sh->role == P11P_R_INIT &&
	    (a->mech == NULL || p11p_mech_names_object(a->mech->mechanism)))
		return 1; /* a handle inside the parameter: the daemon maps it */
	if (!p11p_plane_bound(h, &b, where == OP_NONE)) {
		if (where == OP_PLANE && lock()) { /* unbound meanwhile: it is sent again */
			struct sess *s = lookup(h);

			if (s != NULL && s->ops[sh->kind].where == OP_PLANE)
				s->ops[sh->kind].where = OP_REPLAY;
			unlock();
		}
		return 1;
	}
	if (sh->key && p11p_plane_object(h, &b, a->key, &mkey, 1) != 0) {
		/* a key the daemon does not give: the call goes through it, which answers from
		 * its view of the session's operations (an unknown handle beside an active
		 * operation is CKR_OPERATION_ACTIVE): the ones on the data plane move there */
		p11p_plane_settle(h);
		return 1;
	}
	if (sh->role == P11P_R_INIT && (mech = encode_mechanism(a->mech, &mech_len)) == NULL)
		return 1;
	if (sh->role == P11P_R_INIT && where == OP_NONE && ((const struct ep *)b.ep)->pairs &&
	    defer(h, sh, a, mkey, mech, mech_len)) {
		*rv = CKR_OK;
		return 0;
	}
	p11p_plane_begin(&c, sh->code, nargs_of(sh));
	put_call(&c, sh, b.id, mkey, a, 0);
	local = c.err != CKR_OK; /* not sent: the operation is as it was */
	if (sh->role != P11P_R_INIT && !local && take_deferred(h, sh->kind, &d)) {
		int ret = run_deferred(h, sh, a, &b, &c, &d, rv);

		free(d.mech);
		return ret;
	}
	if (p11p_plane_run(&c, &b, (unsigned)sh->out, &why) != 0) {
		p11p_codec_end(&c);
		free(mech);
		p11p_plane_unbind(h, why);
		return 1;
	}
	if (sh->out)
		p11p_get_out_bytes(&c, a->out, a->out_len);
	*rv = p11p_call_finish(&c);
	if (!local)
		after_call(h, sh, a, *rv, 1, mech, mech_len);
	else
		free(mech);
	return 0;
}

static CK_RV through_daemon(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh,
			    const struct p11p_op_args *a)
{
	struct p11p_call c;
	CK_RV rv;
	int local;

	p11p_call_start(&c, sh->code, nargs_of(sh));
	put_call(&c, sh, h, a->key, a, 1);
	local = c.err != CKR_OK;
	p11p_call_run(&c, (unsigned)sh->out);
	if (sh->out)
		p11p_get_out_bytes(&c, a->out, a->out_len);
	rv = p11p_call_finish(&c);
	if (!local) {
		after_call(h, sh, a, rv, 0, NULL, 0);
		p11p_plane_counted(h, rv);
	}
	return rv;
}

/* An operation lost in a replay is answered once, at the next call of its kind (an init
 * starts afresh): CKR_DEVICE_ERROR, as the daemon answers one (daemon/resolve.py); a
 * deferred init refused when it was sent, that refusal. 0: none was lost. */
static CK_RV lost_once(CK_SESSION_HANDLE h, int kind)
{
	struct sess *s;
	CK_RV lost = CKR_OK;

	if (!lock())
		return CKR_OK;
	s = lookup(h);
	if (s != NULL && s->ops[kind].where == OP_LOST) {
		lost = s->ops[kind].lost_rv != CKR_OK ? s->ops[kind].lost_rv : CKR_DEVICE_ERROR;
		s->ops[kind].where = OP_NONE;
		s->ops[kind].lost_rv = CKR_OK;
	}
	unlock();
	return lost;
}

static CK_RV adopt_updates(CK_SESSION_HANDLE h, const struct op *o)
{
	static const unsigned char none[1];

	for (size_t i = 0; o->replayable && i < o->nups; i++) {
		const struct update *u = &o->ups[i];
		struct p11p_call c;
		CK_RV rv;

		p11p_call_start(&c, P11P_FN_DIRECT_ADOPT_UPDATE, 5);
		p11p_put_session(&c, h);
		p11p_put_ulong(&c, u->code);
		p11p_put_bin(&c, u->data, u->len);
		p11p_put_ulong(&c, u->out ? u->out_len + 256 : 0); /* as a replay asks */
		p11p_put_bin(&c, u->out ? u->digest : none, u->out ? sizeof u->digest : 0);
		p11p_call_run(&c, 0);
		if ((rv = p11p_call_finish(&c)) != CKR_OK)
			return rv;
	}
	return CKR_OK;
}

/* Operation `o` of `kind` (on the data plane, or waiting for its replay) is handed over to
 * the daemon as it runs (DIRECT_ADOPT, then DIRECT_ADOPT_UPDATE per update it keeps for a
 * replay): its member session keeps it, nothing is run again (a replay could fail where
 * the operation goes on: its key destroyed since, the application logged out, or the
 * member session still running it). The daemon takes it while the session is in the
 * member session of its binding (or of the binding the daemon ended itself). 1: the
 * daemon holds it now; 0: refused, nothing recorded; -1: recorded in part (ended there,
 * so lost). */
static int hand_over(CK_SESSION_HANDLE h, int kind, const struct op *o)
{
	struct p11p_call c;

	if (o->mech == NULL)
		return 0;
	p11p_call_start(&c, P11P_FN_DIRECT_ADOPT, 5);
	p11p_put_session(&c, h);
	p11p_put_ulong(&c, o->init_code);
	p11p_put_raw(&c, o->mech, o->mech_len);
	p11p_put_ulong(&c, o->has_key ? o->key : 0);
	p11p_put_ulong(&c, (CK_ULONG)o->replayable);
	p11p_call_run(&c, 0);
	if (p11p_call_finish(&c) != CKR_OK)
		return 0;
	if (adopt_updates(h, o) != CKR_OK) {
		end_operation(h, NULL, kind); /* the daemon's part of it ends */
		return -1;
	}
	return 1;
}

/* The operation of `kind` on the data plane of a session still bound goes to the daemon
 * as it runs (hand_over). 0: it did; -1: refused, it stays on the data plane (and moves
 * as before: ended there, sent again through the daemon). */
static int adopt(CK_SESSION_HANDLE h, int kind)
{
	struct sess *s;
	struct op o;
	int handed;

	memset(&o, 0, sizeof o);
	if (!lock())
		return -1;
	s = lookup(h);
	if (s != NULL && s->ep != NULL && s->ops[kind].where == OP_PLANE &&
	    !s->ops[kind].deferred) { /* a deferred init never ran: it moves by replay */
		o = s->ops[kind];
		memset(&s->ops[kind], 0, sizeof s->ops[kind]);
	}
	unlock();
	if (o.where != OP_PLANE)
		return -1;
	handed = hand_over(h, kind, &o);
	if (handed != 0)
		o.where = handed > 0 ? OP_DAEMON : OP_LOST;
	if (lock()) {
		s = lookup(h);
		if (s != NULL && s->ops[kind].where == OP_NONE) {
			if (o.where == OP_PLANE) {
				s->ops[kind] = o; /* refused: as it was */
				memset(&o, 0, sizeof o);
			} else {
				s->ops[kind].where = o.where;
			}
		}
		unlock();
	}
	op_clear(&o);
	return handed > 0 ? 0 : -1;
}

void p11p_plane_fell_back(CK_SESSION_HANDLE h, int why)
{
	/* a call of no operation answered with a code the daemon decides on left the member
	 * session's operations as they were: handed over as they run, they keep it (the
	 * daemon closes it after such a call otherwise, and they would be sent again) */
	if (why == P11P_WHY_RETURNED)
		for (int k = 0; k < P11P_KINDS; k++)
			if (op_where(h, k) == OP_PLANE)
				(void)adopt(h, k);
	p11p_plane_unbind(h, why);
}

/* The operations of `kinds` on the data plane move to the daemon: handed over as they
 * run (adopt), or else ended on the helper, the session unbound, and sent again through
 * the daemon. `consume`: the caller is a call of those kinds, and a lost one's answer is
 * its own: CKR_DEVICE_ERROR now. */
static CK_RV move_ops(CK_SESSION_HANDLE h, unsigned kinds, int consume)
{
	int moving = 0;
	CK_RV rv = CKR_OK, lost;

	for (int k = 0; k < P11P_KINDS; k++) {
		if ((kinds & (1u << k)) && op_where(h, k) == OP_PLANE) {
			moving = 1;
			(void)adopt(h, k);
		}
	}
	if (moving)
		p11p_plane_unbind(h, P11P_WHY_LEAVING);
	for (int k = 0; k < P11P_KINDS; k++) {
		if (!(kinds & (1u << k)))
			continue;
		if (op_where(h, k) == OP_REPLAY)
			(void)replay(h, k);
		if (consume && (lost = lost_once(h, k)) != CKR_OK)
			rv = lost;
	}
	return rv;
}

/* The kinds whose operations the daemon does not hold yet: on the data plane, or
 * waiting to be replayed through it (their binding went meanwhile). */
static unsigned plane_kinds(CK_SESSION_HANDLE h)
{
	unsigned kinds = 0;

	for (int k = 0; k < P11P_KINDS; k++)
		if (op_where(h, k) == OP_PLANE || op_where(h, k) == OP_REPLAY)
			kinds |= 1u << k;
	return kinds;
}

void p11p_plane_settle(CK_SESSION_HANDLE h)
{
	unsigned kinds = disabled ? 0 : plane_kinds(h);

	if (kinds != 0)
		(void)move_ops(h, kinds, 0);
}

/* The sessions (any of them) whose operations on the data plane, or waiting for their
 * replay, use key `obj` hand them to the daemon, before a C_DestroyObject: the daemon
 * keeps an operation's keys and makes a destroyed session key again for its replay
 * (daemon/record.py), which an operation kept here could not (its replay names the
 * handle, gone by then). A key in use elsewhere is destroyed rarely: each such session
 * is unbound, and binds again at its next operation. */
void p11p_plane_settle_key(CK_OBJECT_HANDLE obj)
{
	CK_SESSION_HANDLE hs[16];
	const unsigned max = sizeof hs / sizeof hs[0];
	unsigned n, rounds = 0;

	if (disabled)
		return;
	do { /* in rounds of `max` sessions: a settled one uses it no more */
		n = 0;
		if (!lock())
			return;
		for (unsigned i = 0; i < BUCKETS && n < max; i++) {
			for (struct sess *s = table[i]; s != NULL && n < max; s = s->next) {
				for (int k = 0; k < P11P_KINDS; k++) {
					const struct op *o = &s->ops[k];

					if ((o->where == OP_PLANE || o->where == OP_REPLAY) &&
					    o->has_key && o->key == obj) {
						hs[n++] = s->h;
						break;
					}
				}
			}
		}
		unlock();
		for (unsigned i = 0; i < n; i++)
			p11p_plane_settle(hs[i]);
	} while (n == max && ++rounds < 256);
}

CK_RV p11p_op_call(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh, const struct p11p_op_args *a)
{
	int where = disabled ? OP_NONE : op_where(h, sh->kind);
	CK_RV rv;

	if (where == OP_LOST && (rv = lost_once(h, sh->kind)) != CKR_OK) {
		if (sh->role != P11P_R_INIT)
			return rv;
		where = OP_NONE;
	}

	if (where == OP_PLANE && length_known(h, sh, a))
		return CKR_OK;
	if (where == OP_PLANE && sh->role == P11P_R_INIT) {
		send_deferred(h, sh->kind);
		where = op_where(h, sh->kind);
	}
	if (where == OP_PLANE || (where == OP_NONE && sh->role == P11P_R_INIT && !disabled)) {
		if (on_plane(h, sh, a, where, &rv) == 0)
			return rv;
		where = op_where(h, sh->kind);
	}
	if (where == OP_REPLAY && replay(h, sh->kind) != CKR_OK &&
	    (rv = lost_once(h, sh->kind)) != CKR_OK)
		return rv;
	if (sh->role == P11P_R_INIT && !disabled) {
		/* the operations of other kinds waiting for their replay (their binding went)
		 * are sent first: the daemon answers an init from the session's whole state
		 * (CKR_OPERATION_ACTIVE beside one), and would take it for idle and move it */
		for (int k = 0; k < P11P_KINDS; k++)
			if (k != sh->kind && op_where(h, k) == OP_REPLAY)
				(void)replay(h, k);
	}
	return through_daemon(h, sh, a);
}

CK_RV p11p_ops_to_daemon(CK_SESSION_HANDLE h, unsigned kinds)
{
	return disabled ? CKR_OK : move_ops(h, kinds, 1);
}

void p11p_ops_after(CK_SESSION_HANDLE h, unsigned kinds, CK_RV rv)
{
	struct sess *s;

	if (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL || !lock())
		return;
	s = lookup(h);
	for (int k = 0; s != NULL && k < P11P_KINDS; k++)
		if (kinds & (1u << k))
			op_clear(&s->ops[k]);
	unlock();
}
