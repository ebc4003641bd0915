/* p11p client — operations that leave the data plane for the daemon (plane_state.h):
 * ended where they run (what ends each kind, as daemon/bind.py STALE_ENDS), handed over
 * as they run (DIRECT_ADOPT: the member session keeps them), or sent again through the
 * daemon (replay: the init and the updates the member consumed, their outputs checked);
 * one that cannot move is lost, and its next call answers CKR_DEVICE_ERROR once. */
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

#define END_CAP 65536          /* an output buffer that fits what ends an operation */

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
void p11p_end_operation(CK_SESSION_HANDLE h, const struct p11p_bound *b, int kind)
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

/* ---- moving an operation to the daemon ---- */

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
		p11p_end_operation(h, NULL, kind); /* the daemon's part of it ends */
		return -1;
	}
	return 1;
}

/* A deferred init the member refused when it was sent again: it is not deferred again. */
static void init_refused(const struct op *o)
{
	if (p11p_plane_lock()) {
		p11p_init_forget(o->init_code, o->mech, o->mech_len, o->key);
		p11p_plane_unlock();
	}
}

/* The operation of `kind`, begun on the data plane and unbound since, goes to the daemon:
 * handed over as it runs when its member session still runs it (hand_over: the daemon
 * ended the binding itself), else sent again: its init and the updates the member
 * consumed, their outputs checked. CKR_OK: it runs through the daemon now; else it is
 * lost (over replay_limit, refused, or other outputs): CKR_DEVICE_ERROR, as the daemon
 * answers a lost one. */
CK_RV p11p_replay(CK_SESSION_HANDLE h, int kind)
{
	struct p11p_call c;
	struct sess *s;
	struct op o;
	CK_RV rv = CKR_DEVICE_ERROR, refused = CKR_OK;
	int started = 0, handed;

	memset(&o, 0, sizeof o);
	if (!p11p_plane_lock())
		return CKR_GENERAL_ERROR;
	s = p11p_sess_lookup(h);
	if (s != NULL && s->ops[kind].where == OP_REPLAY) {
		o = s->ops[kind];
		memset(&s->ops[kind], 0, sizeof s->ops[kind]);
	}
	p11p_plane_unlock();
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
		p11p_end_operation(h, NULL, kind); /* the daemon's part of it ends too */
	if (p11p_plane_lock()) {
		s = p11p_sess_lookup(h);
		if (s != NULL) {
			s->ops[kind].where = rv == CKR_OK ? OP_DAEMON : OP_LOST;
			s->ops[kind].lost_rv = refused;
		}
		p11p_plane_unlock();
	}
	p11p_op_clear(&o);
	return rv;
}

/* An operation lost in a replay is answered once, at the next call of its kind (an init
 * starts afresh): CKR_DEVICE_ERROR, as the daemon answers one (daemon/resolve.py); a
 * deferred init refused when it was sent, that refusal. 0: none was lost. */
CK_RV p11p_lost_once(CK_SESSION_HANDLE h, int kind)
{
	struct sess *s;
	CK_RV lost = CKR_OK;

	if (!p11p_plane_lock())
		return CKR_OK;
	s = p11p_sess_lookup(h);
	if (s != NULL && s->ops[kind].where == OP_LOST) {
		lost = s->ops[kind].lost_rv != CKR_OK ? s->ops[kind].lost_rv : CKR_DEVICE_ERROR;
		s->ops[kind].where = OP_NONE;
		s->ops[kind].lost_rv = CKR_OK;
	}
	p11p_plane_unlock();
	return lost;
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
	if (!p11p_plane_lock())
		return -1;
	s = p11p_sess_lookup(h);
	if (s != NULL && s->ep != NULL && s->ops[kind].where == OP_PLANE &&
	    !s->ops[kind].deferred) { /* a deferred init never ran: it moves by replay */
		o = s->ops[kind];
		memset(&s->ops[kind], 0, sizeof s->ops[kind]);
	}
	p11p_plane_unlock();
	if (o.where != OP_PLANE)
		return -1;
	handed = hand_over(h, kind, &o);
	if (handed != 0)
		o.where = handed > 0 ? OP_DAEMON : OP_LOST;
	if (p11p_plane_lock()) {
		s = p11p_sess_lookup(h);
		if (s != NULL && s->ops[kind].where == OP_NONE) {
			if (o.where == OP_PLANE) {
				s->ops[kind] = o; /* refused: as it was */
				memset(&o, 0, sizeof o);
			} else {
				s->ops[kind].where = o.where;
			}
		}
		p11p_plane_unlock();
	}
	p11p_op_clear(&o);
	return handed > 0 ? 0 : -1;
}

void p11p_plane_fell_back(CK_SESSION_HANDLE h, int why)
{
	/* a call of no operation answered with a code the daemon decides on left the member
	 * session's operations as they were: handed over as they run, they keep it (the
	 * daemon closes it after such a call otherwise, and they would be sent again) */
	if (why == P11P_WHY_RETURNED)
		for (int k = 0; k < P11P_KINDS; k++)
			if (p11p_op_where(h, k) == OP_PLANE)
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
		if ((kinds & (1u << k)) && p11p_op_where(h, k) == OP_PLANE) {
			moving = 1;
			(void)adopt(h, k);
		}
	}
	if (moving)
		p11p_plane_unbind(h, P11P_WHY_LEAVING);
	for (int k = 0; k < P11P_KINDS; k++) {
		if (!(kinds & (1u << k)))
			continue;
		if (p11p_op_where(h, k) == OP_REPLAY)
			(void)p11p_replay(h, k);
		if (consume && (lost = p11p_lost_once(h, k)) != CKR_OK)
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
		if (p11p_op_where(h, k) == OP_PLANE || p11p_op_where(h, k) == OP_REPLAY)
			kinds |= 1u << k;
	return kinds;
}

void p11p_plane_settle(CK_SESSION_HANDLE h)
{
	unsigned kinds = p11p_plane_off ? 0 : plane_kinds(h);

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

	if (p11p_plane_off)
		return;
	do { /* in rounds of `max` sessions: a settled one uses it no more */
		n = p11p_sess_using_key(obj, hs, max);
		for (unsigned i = 0; i < n; i++)
			p11p_plane_settle(hs[i]);
	} while (n == max && ++rounds < 256);
}

CK_RV p11p_ops_to_daemon(CK_SESSION_HANDLE h, unsigned kinds)
{
	return p11p_plane_off ? CKR_OK : move_ops(h, kinds, 1);
}

void p11p_ops_after(CK_SESSION_HANDLE h, unsigned kinds, CK_RV rv)
{
	struct sess *s;

	if (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL || !p11p_plane_lock())
		return;
	s = p11p_sess_lookup(h);
	for (int k = 0; s != NULL && k < P11P_KINDS; k++)
		if (kinds & (1u << k))
			p11p_op_clear(&s->ops[k]);
	p11p_plane_unlock();
}
