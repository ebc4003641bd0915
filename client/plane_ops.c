/* p11p client — one call of an operation (plane_state.h), wherever it runs: on the data
 * plane when its session is bound (an init answered CKR_OK before deferred to go with
 * the next call), else through the daemon; and afterwards what the operation's state
 * becomes (PKCS#11 §5.2), with what its replay needs. */
#include <errno.h>
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

/* ---- what a call leaves of its operation ---- */

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

	if (!p11p_plane_lock()) {
		free(mech);
		return;
	}
	if (sh->role == P11P_R_INIT && plane && mech != NULL) {
		if (rv == CKR_OK)
			p11p_init_learnt(sh->code, mech, mech_len, sh->key ? a->key : 0);
		else
			p11p_init_forget(sh->code, mech, mech_len, sh->key ? a->key : 0);
	}
	s = sh->role == P11P_R_INIT && rv == CKR_OK ? p11p_sess_add(h) : p11p_sess_lookup(h);
	if (s == NULL) {
		p11p_plane_unlock();
		free(mech);
		return;
	}
	o = &s->ops[sh->kind];
	switch (sh->role) {
	case P11P_R_INIT:
		if (rv != CKR_OK)
			break;
		p11p_op_clear(o);
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
			p11p_op_clear(o); /* a refused C_DigestKey leaves the digest (daemon/policy.py) */
		}
		break;
	default:
		if (rv == CKR_OK && plane && p11p_is_length_query(sh, a))
			p11p_length_learnt(o, sh, a);
		if (rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && sh->out && a->out == NULL))
			break;
		p11p_op_clear(o);
	}
	p11p_plane_unlock();
	free(mech);
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
 * go with the operation's next call: 1 (`mech` taken), or 0. Only in a session with no
 * operation of any kind: beside one the member answers (CKR_OPERATION_ACTIVE, SoftHSM2). */
static int defer(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh, const struct p11p_op_args *a,
		 CK_OBJECT_HANDLE mkey, unsigned char *mech, size_t mech_len)
{
	CK_OBJECT_HANDLE key = sh->key ? a->key : 0;
	struct sess *s;
	struct op *o;
	int done = 0;

	if (!p11p_plane_lock())
		return 0;
	s = p11p_init_known(sh->code, mech, mech_len, key) ? p11p_sess_lookup(h) : NULL;
	if (s != NULL && s->ep != NULL && p11p_sess_idle(s)) {
		o = &s->ops[sh->kind];
		p11p_op_clear(o);
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
	p11p_plane_unlock();
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

	if (!p11p_plane_lock())
		return 0;
	s = p11p_sess_lookup(h);
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
	p11p_plane_unlock();
	return found;
}

/* What the member answered the deferred init `d` of `kind`: CKR_OK, it runs there now;
 * else the operation is over (and the init is not deferred again). */
static void deferred_answered(CK_SESSION_HANDLE h, int kind, const struct deferred *d, CK_RV rv)
{
	struct sess *s;

	if (!p11p_plane_lock())
		return;
	if (rv != CKR_OK)
		p11p_init_forget(d->code, d->mech, d->mech_len, d->key);
	s = p11p_sess_lookup(h);
	if (s != NULL && s->ops[kind].where == OP_PLANE && s->ops[kind].deferred) {
		if (rv == CKR_OK)
			s->ops[kind].deferred = 0;
		else
			p11p_op_clear(&s->ops[kind]);
	}
	p11p_plane_unlock();
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
	if (ci.err != CKR_OK || p11p_plane_run_pair(&ci, c, b, (unsigned)sh->out, &why) != 0) {
		p11p_codec_end(&ci);
		p11p_codec_end(c);
		p11p_plane_unbind(h, why); /* it is sent again through the daemon (replay) */
		return 1;
	}
	if (p11p_ep_fallback(b->ep, ci.rv)) {
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
	if (p11p_ep_fallback(b->ep, c->rv)) {
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

/* An init while a deferred one of `kind` waits in the session (of its kind or another):
 * that one is sent first, alone (the member answers the new one as it would beside it). */
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
		if (where == OP_PLANE && p11p_plane_lock()) { /* unbound meanwhile: it is sent again */
			struct sess *s = p11p_sess_lookup(h);

			if (s != NULL && s->ops[sh->kind].where == OP_PLANE)
				s->ops[sh->kind].where = OP_REPLAY;
			p11p_plane_unlock();
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
	if (sh->role == P11P_R_INIT && where == OP_NONE && p11p_ep_pairs(b.ep) &&
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

CK_RV p11p_op_call(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh, const struct p11p_op_args *a)
{
	unsigned waiting = 0; /* kinds whose init is deferred */
	int where = p11p_plane_off ? OP_NONE : p11p_op_state(h, sh->kind, &waiting);
	CK_RV rv;

	if (where == OP_LOST && (rv = p11p_lost_once(h, sh->kind)) != CKR_OK) {
		if (sh->role != P11P_R_INIT)
			return rv;
		where = OP_NONE;
	}

	if (where == OP_PLANE && p11p_length_known(h, sh, a))
		return CKR_OK;
	if (sh->role == P11P_R_INIT && waiting != 0) { /* the member answers this one beside them */
		for (int k = 0; k < P11P_KINDS; k++)
			if (waiting & 1u << k)
				send_deferred(h, k);
		where = p11p_op_where(h, sh->kind);
	}
	if (where == OP_PLANE || (where == OP_NONE && sh->role == P11P_R_INIT && !p11p_plane_off)) {
		if (on_plane(h, sh, a, where, &rv) == 0)
			return rv;
		where = p11p_op_where(h, sh->kind);
	}
	if (where == OP_REPLAY && p11p_replay(h, sh->kind) != CKR_OK &&
	    (rv = p11p_lost_once(h, sh->kind)) != CKR_OK)
		return rv;
	if (sh->role == P11P_R_INIT && !p11p_plane_off) {
		/* the operations of other kinds waiting for their replay (their binding went)
		 * are sent first: the daemon answers an init from the session's whole state
		 * (CKR_OPERATION_ACTIVE beside one), and would take it for idle and move it */
		for (int k = 0; k < P11P_KINDS; k++)
			if (k != sh->kind && p11p_op_where(h, k) == OP_REPLAY)
				(void)p11p_replay(h, k);
	}
	return through_daemon(h, sh, a);
}
