/* p11p client — what the data plane remembers of the member's answers, to save a round
 * trip (plane_state.h): the length of a signature, and the inits it answered CKR_OK
 * (deferred inits). Both are keyed by the operation's init (code, mechanism with its
 * parameter, virtual key), under the library's lock, and expire at a C_DestroyObject or
 * C_Logout of this process (p11p_destroy_gen). */
#include <stdlib.h>
#include <string.h>

#include "direct.h"
#include "plane_state.h"

#define LENGTHS 16             /* signature lengths remembered (length queries) */
#define INITS 16               /* operation inits remembered as answered CKR_OK */

/* ---- signature lengths: a length query answered as the member answered it before ----
 *
 * A signature's length depends on the key and the mechanism, not on the data (PKCS#11
 * signatures are fixed-size: RSA, ECDSA's r|s, EdDSA, MACs), so the answer to a length
 * query of C_Sign or C_SignFinal on the data plane is remembered, keyed by the
 * operation's init (code, mechanism with its parameter, virtual key), the call and its
 * data length, and the next such query is answered here: the two-call convention
 * (length, then signature) costs one round trip. Under the lock; a C_DestroyObject or
 * C_Logout (p11p_destroy_gen) expires them. */
static struct length {
	unsigned long init_code, code;
	unsigned char *mech;
	size_t mech_len;
	CK_OBJECT_HANDLE key;
	CK_ULONG in_len, out_len;
	unsigned gen;
} lengths[LENGTHS];
static unsigned next_length;

int p11p_is_length_query(const struct p11p_op_shape *sh, const struct p11p_op_args *a)
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

		if (l->mech != NULL && l->gen == p11p_destroy_gen && l->code == sh->code &&
		    l->init_code == o->init_code && l->key == o->key && l->in_len == in_len &&
		    l->mech_len == o->mech_len && memcmp(l->mech, o->mech, o->mech_len) == 0)
			return l;
	}
	return NULL;
}

/* A length query of an operation on the data plane answered from what the member said
 * (1), or not (0). */
int p11p_length_known(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh,
		      const struct p11p_op_args *a)
{
	const struct sess *s;
	const struct length *l = NULL;

	if (!p11p_is_length_query(sh, a) || !p11p_plane_lock())
		return 0;
	s = p11p_sess_lookup(h);
	if (s != NULL && s->ops[sh->kind].where == OP_PLANE && s->ops[sh->kind].mech != NULL)
		l = length_of(&s->ops[sh->kind], sh, a);
	if (l != NULL)
		*a->out_len = l->out_len;
	p11p_plane_unlock();
	return l != NULL;
}

/* The member answered a length query of an operation on the data plane (under the lock). */
void p11p_length_learnt(const struct op *o, const struct p11p_op_shape *sh,
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
			      sh->role == P11P_R_ONESHOT ? a->in_len[0] : 0, *a->out_len, p11p_destroy_gen };
}

void p11p_lengths_reset(void)
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
 * C_DestroyObject or C_Logout of this process since (p11p_destroy_gen), is answered CKR_OK
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

void p11p_init_learnt(unsigned long code, const unsigned char *mech, size_t len,
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
	e->gen = p11p_destroy_gen;
}

void p11p_init_forget(unsigned long code, const unsigned char *mech, size_t len,
		      CK_OBJECT_HANDLE key)
{
	struct init *e = init_of(code, mech, len, key);

	if (e != NULL) {
		free(e->mech);
		memset(e, 0, sizeof *e);
	}
}

void p11p_inits_reset(void)
{
	for (unsigned i = 0; i < INITS; i++)
		free(inits[i].mech);
	memset(inits, 0, sizeof inits);
	next_init = 0;
}

/* An init answered CKR_OK before, with no C_DestroyObject or C_Logout since (1), or not. */
int p11p_init_known(unsigned long code, const unsigned char *mech, size_t len,
		    CK_OBJECT_HANDLE key)
{
	const struct init *e = init_of(code, mech, len, key);

	return e != NULL && e->gen == p11p_destroy_gen;
}
