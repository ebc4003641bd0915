/* p11p client — the data plane's table and bindings (see direct.h; its other parts are
 * named in plane_state.h): a table of the sessions that made calls of the data plane
 * (bound or not; per operation kind where the operation runs and what its replay needs),
 * and a session's binding to a helper, asked of the daemon (DIRECT_BIND), ended
 * (DIRECT_UNBIND), and the member handles it gives (DIRECT_KEY, DIRECT_OBJECT). The
 * table is guarded by the library's lock; the calls themselves run outside it. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "call.h"
#include "direct.h"
#include "gen/codes.h"
#include "link.h"
#include "plane_state.h"
#include "sessions.h"
#include "state.h"

#define BUCKETS 256
#define BIND_AFTER 3           /* data-plane calls through the daemon before asking to bind */
#define BIND_RETRY_MS 1000     /* after a refusal or an unbind */

static struct sess *table[BUCKETS];
unsigned p11p_destroy_gen;
int p11p_plane_off;
static int old_daemon;         /* its binding has no replay_limit: no data plane with it */

int p11p_plane_lock(void)
{
	return p11p_lock_acquire(&p11p_state.lock) == CKR_OK;
}

void p11p_plane_unlock(void)
{
	p11p_lock_release(&p11p_state.lock);
}

void p11p_direct_setup(void)
{
	const char *env = secure_getenv("P11P_DIRECT");

	p11p_plane_off = env != NULL && strcmp(env, "0") == 0;
	old_daemon = 0;
}

void p11p_op_clear(struct op *o)
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
		p11p_op_clear(&s->ops[k]);
	free(s);
}

void p11p_direct_reset(int ours)
{
	p11p_lengths_reset();
	p11p_inits_reset();
	for (unsigned i = 0; i < BUCKETS; i++) {
		while (table[i] != NULL) {
			struct sess *s = table[i];

			table[i] = s->next;
			sess_free(s);
		}
	}
	p11p_eps_reset(ours);
}

/* ---- the session table (under the lock) ---- */

static struct sess **slot_of(CK_SESSION_HANDLE h)
{
	struct sess **p = &table[(h ^ (h >> 8)) % BUCKETS];

	while (*p != NULL && (*p)->h != h)
		p = &(*p)->next;
	return p;
}

struct sess *p11p_sess_lookup(CK_SESSION_HANDLE h)
{
	return *slot_of(h);
}

struct sess *p11p_sess_add(CK_SESSION_HANDLE h)
{
	struct sess *s = p11p_sess_lookup(h);

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
	if (p11p_plane_lock()) {
		drop_where(is_session, h);
		p11p_plane_unlock();
	}
}

void p11p_plane_forget_slot(CK_SLOT_ID slot)
{
	if (p11p_plane_lock()) {
		drop_where(on_slot, slot);
		p11p_plane_unlock();
	}
}

void p11p_plane_destroyed(void)
{
	if (p11p_plane_lock()) {
		p11p_destroy_gen++;
		p11p_plane_unlock();
	}
}

/* The daemon's answer says the session exists: it is counted (and made known). */
void p11p_plane_counted(CK_SESSION_HANDLE h, CK_RV rv)
{
	struct sess *s;

	if (p11p_plane_off || rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
	    rv == CKR_CRYPTOKI_NOT_INITIALIZED || rv == CKR_DEVICE_ERROR || !p11p_plane_lock())
		return;
	s = p11p_sess_add(h);
	if (s != NULL)
		s->calls++;
	p11p_plane_unlock();
}

int p11p_op_where(CK_SESSION_HANDLE h, int kind)
{
	unsigned deferred;

	return p11p_op_state(h, kind, &deferred);
}

int p11p_op_state(CK_SESSION_HANDLE h, int kind, unsigned *deferred)
{
	const struct sess *s;
	int where = OP_NONE;

	*deferred = 0;
	if (!p11p_plane_lock())
		return OP_NONE;
	s = p11p_sess_lookup(h);
	for (int k = 0; s != NULL && k < P11P_KINDS; k++)
		if (s->ops[k].where == OP_PLANE && s->ops[k].deferred)
			*deferred |= 1u << k;
	if (s != NULL)
		where = s->ops[kind].where;
	p11p_plane_unlock();
	return where;
}

int p11p_sess_idle(const struct sess *s)
{
	for (int k = 0; k < P11P_KINDS; k++)
		if (s->ops[k].where != OP_NONE)
			return 0;
	return 1;
}

/* ---- binding ---- */

void p11p_plane_unbind(CK_SESSION_HANDLE h, int why)
{
	struct p11p_call c;
	struct sess *s;
	struct p11p_bound b = { NULL, 0, 0 };
	int plane[P11P_KINDS] = { 0 };

	if (!p11p_plane_lock())
		return;
	s = p11p_sess_lookup(h);
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
	p11p_plane_unlock();
	if (b.ep == NULL)
		return;
	/* what the member session still runs would meet their replay there */
	if (why == P11P_WHY_RETURNED || why == P11P_WHY_LEAVING)
		for (int k = 0; k < P11P_KINDS; k++)
			if (plane[k])
				p11p_end_operation(h, &b, k);
	p11p_call_start(&c, P11P_FN_DIRECT_UNBIND, 2);
	p11p_put_session(&c, h);
	p11p_put_ulong(&c, (CK_ULONG)why);
	p11p_call_run(&c, 0);
	(void)p11p_call_finish(&c);
}

/* [name, token, id, timeout_ms, slot, [rv...], replay_limit[, cpu_hint[, pairs[, mailbox]]]] of a
 * DIRECT_BIND reply, into the session's entry. 0, or -1 when it does not fit. */
static int take_binding(const msgpack_object *o, CK_SESSION_HANDLE h, struct p11p_bound *b)
{
	const msgpack_object *f;
	CK_ULONG id, timeout, slot, limit;
	struct sess *s;
	struct ep *ep;
	int ret = -1, hint = 0, pairs = 0, mailbox = 0;

	if (o == NULL || o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 7 ||
	    o->via.array.size > 10)
		return -1;
	f = o->via.array.ptr;
	if (o->via.array.size >= 8) {  /* the hello agreed cpu_hint */
		if (f[7].type != MSGPACK_OBJECT_BOOLEAN)
			return -1;
		hint = f[7].via.boolean;
	}
	if (o->via.array.size >= 9) {  /* ... and plane_pairs */
		if (f[8].type != MSGPACK_OBJECT_BOOLEAN)
			return -1;
		pairs = f[8].via.boolean;
	}
	if (o->via.array.size == 10) {  /* ... and plane_mailbox */
		if (f[9].type != MSGPACK_OBJECT_BOOLEAN)
			return -1;
		mailbox = f[9].via.boolean;
	}
	if (f[0].type != MSGPACK_OBJECT_BIN || f[0].via.bin.size == 0 || f[0].via.bin.size > 100 ||
	    f[1].type != MSGPACK_OBJECT_BIN || f[1].via.bin.size != TOKEN ||
	    p11p_obj_ulong(&f[2], &id) != 0 || id == 0 || p11p_obj_ulong(&f[3], &timeout) != 0 ||
	    timeout == 0 || timeout > 0x7fffffffUL || p11p_obj_ulong(&f[4], &slot) != 0 ||
	    f[5].type != MSGPACK_OBJECT_ARRAY || f[5].via.array.size > MAX_FALLBACK ||
	    p11p_obj_ulong(&f[6], &limit) != 0)
		return -1;
	if (!p11p_plane_lock())
		return -1;
	s = p11p_sess_lookup(h);
	ep = s != NULL ? p11p_ep_get(f, (int)timeout, hint, pairs, mailbox) : NULL;
	if (ep != NULL) {
		s->ep = b->ep = ep;
		s->id = b->id = id;
		s->slot = b->slot = slot;
		s->replay_limit = limit;
		s->nkeys = 0;
		ret = 0;
	}
	p11p_plane_unlock();
	return ret;
}

int p11p_plane_bound(CK_SESSION_HANDLE h, struct p11p_bound *b, int may_bind)
{
	struct p11p_call c;
	const msgpack_object *o = NULL;
	struct sess *s;
	int ask = 0, ok = 0, old = 0;

	if (p11p_plane_off || !p11p_plane_lock())
		return 0;
	s = p11p_sess_lookup(h);
	if (s != NULL && s->ep != NULL) {
		b->ep = s->ep;
		b->id = s->id;
		b->slot = s->slot;
		ok = 1;
	} else if (s != NULL && may_bind && !old_daemon && s->calls >= BIND_AFTER && p11p_sess_idle(s) &&
		   p11p_now_ms() >= s->retry_ms) {
		s->retry_ms = p11p_now_ms() + BIND_RETRY_MS; /* one request at a time */
		ask = 1;
	}
	p11p_plane_unlock();
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
		if (p11p_plane_lock()) {
			old_daemon = 1;
			p11p_plane_unlock();
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

	if (!p11p_plane_lock())
		return -1;
	s = p11p_sess_lookup(h);
	if (s != NULL && s->key_gen != p11p_destroy_gen) {
		s->nkeys = 0;
		s->key_gen = p11p_destroy_gen;
	}
	for (unsigned i = 0; s != NULL && i < s->nkeys && i < KEYS; i++) {
		if (s->keys[i].v == v && s->keys[i].use >= use) {
			*m = s->keys[i].m;
			found = 1;
			break;
		}
	}
	p11p_plane_unlock();
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
	if (p11p_plane_lock()) {
		s = p11p_sess_lookup(h);
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
		p11p_plane_unlock();
	}
	return 0;
}

unsigned p11p_sess_using_key(CK_OBJECT_HANDLE obj, CK_SESSION_HANDLE *hs, unsigned max)
{
	unsigned n = 0;

	if (!p11p_plane_lock())
		return 0;
	for (unsigned i = 0; i < BUCKETS && n < max; i++) {
		for (struct sess *s = table[i]; s != NULL && n < max; s = s->next) {
			for (int k = 0; k < P11P_KINDS; k++) {
				const struct op *o = &s->ops[k];

				if ((o->where == OP_PLANE || o->where == OP_REPLAY) && o->has_key &&
				    o->key == obj) {
					hs[n++] = s->h;
					break;
				}
			}
		}
	}
	p11p_plane_unlock();
	return n;
}
