/* p11p client — the data plane's state, shared by its parts (internal to them): per
 * session that made calls of the data plane (direct.c's table, under the library's
 * lock) its binding and, per operation kind, where the operation runs and what its
 * replay needs. The parts: direct.c (the table and the binding), plane_link.c (the
 * helpers' endpoints and one call's round trip), plane_memo.c (the member's answers
 * remembered: signature lengths, deferred inits), plane_ops.c (one operation call),
 * plane_move.c (operations moving to the daemon: ended, handed over, replayed). */
#ifndef P11P_PLANE_STATE_H
#define P11P_PLANE_STATE_H

#include <stdint.h>

#include "direct.h"

#define TOKEN 16                /* a helper listener's token */
#define MAX_FALLBACK 64         /* codes a helper sends back to the daemon */
#define KEYS 8                  /* member handles remembered per session */

/* Where an operation of a session runs. */
enum { OP_NONE, OP_PLANE, OP_DAEMON, OP_REPLAY /* was on the data plane: sent again first */,
       OP_LOST /* could not be sent again: its next call answers CKR_DEVICE_ERROR */ };

struct ep; /* a helper's listener and its idle connections (plane_link.c) */

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

/* direct.c: the library's lock, around the table and everything in it */
int p11p_plane_lock(void);
void p11p_plane_unlock(void);
/* direct.c, under the lock: a session's entry (NULL: none), made when missing (NULL: no
 * memory); an operation's state freed and cleared */
struct sess *p11p_sess_lookup(CK_SESSION_HANDLE h);
struct sess *p11p_sess_add(CK_SESSION_HANDLE h);
void p11p_op_clear(struct op *o);
/* direct.c, under the lock: whether no operation of any kind is in the session */
int p11p_sess_idle(const struct sess *s);
/* direct.c: where the operation of `kind` of a session runs (OP_*; takes the lock) */
int p11p_op_where(CK_SESSION_HANDLE h, int kind);
/* direct.c: as p11p_op_where, and the kinds (bit 1 << kind) of the session's operations
 * whose init is deferred (*deferred) */
int p11p_op_state(CK_SESSION_HANDLE h, int kind, unsigned *deferred);
/* direct.c: up to `max` sessions whose operations on the data plane, or waiting for their
 * replay, use key `obj` (takes the lock) */
unsigned p11p_sess_using_key(CK_OBJECT_HANDLE obj, CK_SESSION_HANDLE *hs, unsigned max);
extern unsigned p11p_destroy_gen; /* C_DestroyObject, C_Logout: remembered handles expire */
extern int p11p_plane_off;        /* P11P_DIRECT=0: no data plane */

/* plane_link.c: under the lock, the endpoint of a DIRECT_BIND reply's fields (f: name,
 * token, ..., [rv...]), made when new; whether an endpoint's helper sends `rv` back to
 * the daemon; whether it answers pairs; the endpoints closed and freed (reset) */
struct ep *p11p_ep_get(const msgpack_object *f, int timeout_ms, int cpu_hint, int pairs,
		       int mailbox);
int p11p_ep_fallback(const struct ep *ep, CK_RV rv);
int p11p_ep_pairs(const struct ep *ep);
void p11p_eps_reset(int ours);  /* as p11p_direct_reset */
/* plane_link.c: an operation's deferred init `ci` and its next call `c` in one send */
int p11p_plane_run_pair(struct p11p_call *ci, struct p11p_call *c, const struct p11p_bound *b,
			unsigned nouts, int *why);

/* plane_memo.c: signature lengths and deferred inits (under the lock but for
 * p11p_length_known, which takes it) */
int p11p_is_length_query(const struct p11p_op_shape *sh, const struct p11p_op_args *a);
int p11p_length_known(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh,
		      const struct p11p_op_args *a);
void p11p_length_learnt(const struct op *o, const struct p11p_op_shape *sh,
			const struct p11p_op_args *a);
void p11p_lengths_reset(void);
int p11p_init_known(unsigned long code, const unsigned char *mech, size_t len,
		    CK_OBJECT_HANDLE key);
void p11p_init_learnt(unsigned long code, const unsigned char *mech, size_t len,
		      CK_OBJECT_HANDLE key);
void p11p_init_forget(unsigned long code, const unsigned char *mech, size_t len,
		      CK_OBJECT_HANDLE key);
void p11p_inits_reset(void);

/* plane_move.c: the operation of `kind` ended where it runs (on the helper b, or through
 * the daemon: b NULL); one waiting for its replay sent again through the daemon; a lost
 * one's answer, once */
void p11p_end_operation(CK_SESSION_HANDLE h, const struct p11p_bound *b, int kind);
CK_RV p11p_replay(CK_SESSION_HANDLE h, int kind);
CK_RV p11p_lost_once(CK_SESSION_HANDLE h, int kind);

#endif
