/* p11p client — the data plane (direct.c and its parts, named in plane_state.h; plane.c):
 * once a session has made a few calls of the data plane through the daemon, the library
 * asks the daemon to bind it (P11P_FN_DIRECT_BIND); from then on every call of the data
 * plane (functions.spec `@direct`: the operation families, random, C_GetAttributeValue,
 * C_GetSessionInfo) goes straight to the helper that holds its member session, one
 * socket hop instead of two, with member handles the daemon gives (P11P_FN_DIRECT_KEY,
 * _OBJECT). Searches stay with the daemon (find.c: FIND_ALL hands the whole result over
 * at once).
 *
 * Per session and operation kind the library knows where an operation runs: on the
 * data plane, or through the daemon (which then keeps it until it ends). For one on the
 * data plane it keeps what replay needs (the init, the data of the updates the member
 * consumed and a digest of their outputs, up to the group's replay_limit). Whenever a
 * call cannot be answered on the data plane (a code of the daemon's fallback list, a
 * broken connection, a time-out), the session is unbound (P11P_FN_DIRECT_UNBIND), its
 * operations are sent again through the daemon (their outputs checked against the
 * digests; a mismatch or an operation over the limit is lost: CKR_DEVICE_ERROR, as the
 * daemon answers one), and the call goes through the daemon. The generated stubs of the
 * wrapped functions (p11p_wire_*) are the way to the daemon. protocol/README.md,
 * "Data plane". */
#ifndef P11P_DIRECT_H
#define P11P_DIRECT_H

#include <stdint.h>

#include "codec.h"
#include "gen/codes.h"
#include "gen/wire.h"

/* The digest of an operation's output kept for its replay (blake2b.c): BLAKE2b of 16
 * bytes, the daemon's (daemon/shapes.py digest), so that an operation handed over to
 * the daemon carries digests it compares. */
#define P11P_DIGEST_SIZE 16
void p11p_digest16(const unsigned char *p, size_t n, unsigned char out[P11P_DIGEST_SIZE]);

/* p11p's own function codes (gen/codes.h, from functions.spec):
 * [DIRECT_BIND, session] -> [rv, [name, token, id, timeout_ms, slot, [rv...], replay_limit]]
 * [DIRECT_KEY, session, object] -> [rv, member handle]   (a key an operation uses)
 * [DIRECT_UNBIND, session, why] -> [rv]
 * [DIRECT_OBJECT, session, object] -> [rv, member handle]   (an object whose attributes are read)
 * [DIRECT_ADOPT, session, init code, mechanism, key, replayable] -> [rv]
 * [DIRECT_ADOPT_UPDATE, session, code, data, out capacity (0: none), digest] -> [rv] */

/* Why a session is unbound (daemon/direct.py) */
enum { P11P_WHY_RETURNED = 0, P11P_WHY_LEAVING = 1, P11P_WHY_BROKEN = 2, P11P_WHY_TIMEOUT = 3 };

/* The operation kinds (functions.spec @op), and a call's part in one. */
enum { P11P_K_ENCRYPT, P11P_K_DECRYPT, P11P_K_DIGEST, P11P_K_SIGN, P11P_K_VERIFY,
       P11P_K_SIGN_RECOVER, P11P_K_VERIFY_RECOVER, P11P_KINDS };
enum { P11P_R_INIT, P11P_R_UPDATE, P11P_R_FINAL, P11P_R_ONESHOT };

/* How one operation call travels: [code, session, (mechanism), (key), bytes..., (out)]. */
struct p11p_op_shape {
	unsigned long code;
	int kind, role;
	int mech, key;   /* takes a mechanism, a key handle (an init) */
	int nbytes;      /* byte-string inputs: 0, 1 or 2 */
	int out;         /* has an out_bytes output */
	int opaque;      /* never on the data plane (C_DigestKey): its operation moves first */
};

struct p11p_op_args {
	const CK_MECHANISM *mech;
	CK_OBJECT_HANDLE key;
	CK_BYTE_PTR in[2];
	CK_ULONG in_len[2];
	CK_BYTE_PTR out;
	CK_ULONG_PTR out_len;
};

/* A binding as a call uses it. */
struct p11p_bound {
	void *ep;
	uint64_t id;
	CK_SLOT_ID slot;
};

/* Inputs larger than this go through the daemon. */
#define P11P_PLANE_MAX_DATA (1u << 20)

/* One call of an operation, wherever it runs (plane_ops.c). Called inside p11p_enter. */
CK_RV p11p_op_call(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh, const struct p11p_op_args *a);
/* Before a call that acts on operations of these kinds (a bit per kind) outside the data
 * plane: those on the data plane move to the daemon. CKR_OK, or the lost one's code. */
CK_RV p11p_ops_to_daemon(CK_SESSION_HANDLE h, unsigned kinds);
/* Before a call the daemon answers from its view of the session's operations (a
 * search): those on the data plane move there (a lost one answers its next call). */
void p11p_plane_settle(CK_SESSION_HANDLE h);
/* Before a C_DestroyObject of obj: every session's operations that use it, as above. */
void p11p_plane_settle_key(CK_OBJECT_HANDLE obj);
/* After such a call returned rv: an error other than CKR_BUFFER_TOO_SMALL ends them. */
void p11p_ops_after(CK_SESSION_HANDLE h, unsigned kinds, CK_RV rv);

/* For the calls of the data plane that are no operation (plane.c). */
int p11p_plane_bound(CK_SESSION_HANDLE h, struct p11p_bound *b, int may_bind);
void p11p_plane_begin(struct p11p_call *c, unsigned long code, unsigned nargs);
/* 0: c holds the helper's answer; 1: the daemon must take the call (*why). */
int p11p_plane_run(struct p11p_call *c, const struct p11p_bound *b, unsigned nouts, int *why);
void p11p_plane_unbind(CK_SESSION_HANDLE h, int why);
/* A call of no operation (random, attributes, session info) fell back to the daemon
 * (why): the session is unbound, its operations handed over first when they still run. */
void p11p_plane_fell_back(CK_SESSION_HANDLE h, int why);
/* The member handle of object v: use 1 for a key an operation uses, 0 for a read of its
 * attributes. 0, or -1 (the call goes through the daemon). */
int p11p_plane_object(CK_SESSION_HANDLE h, const struct p11p_bound *b, CK_OBJECT_HANDLE v,
		      CK_OBJECT_HANDLE *m, int use);
/* A call of the data plane went through the daemon and returned rv. */
void p11p_plane_counted(CK_SESSION_HANDLE h, CK_RV rv);
/* The session's entries go (C_CloseSession; C_CloseAllSessions of a slot). */
void p11p_plane_forget(CK_SESSION_HANDLE h);
void p11p_plane_forget_slot(CK_SLOT_ID slot);
/* A C_DestroyObject or a C_Logout succeeded: remembered member handles expire. */
void p11p_plane_destroyed(void);

/* Reads P11P_DIRECT (0: never bind) at C_Initialize. */
void p11p_direct_setup(void);
/* Forgets every binding and operation and closes every connection to a helper
 * (C_Initialize, C_Finalize, a forked child). Called with no call in flight, or in the
 * child after fork(). `ours`: the connections are this process's (C_Finalize), whose
 * helper threads are told they end; not a parent's, which the parent keeps using. */
void p11p_direct_reset(int ours);

#endif
