/* p11p client — the entry points of the data plane's functions (functions.spec `@direct`,
 * and the calls that act on their operations outside it). Each describes its call to
 * the engine (direct.c and its parts, plane_state.h), which sends it to the bound helper or through the daemon and
 * keeps the operation's state; see direct.h. */
#include "call.h"
#include "direct.h"
#include "gen/codes.h"
#include "gen/wire.h"
#include "kept.h"
#include "link.h"
#include "sessions.h"

#define ALL_KINDS ((1u << P11P_KINDS) - 1u)
#define BIT(k) (1u << (k))

/* code, kind, role, mechanism, key, byte inputs, output, opaque */
#define INIT(code, kind, key) { code, kind, P11P_R_INIT, 1, key, 0, 0, 0 }
#define ONESHOT(code, kind, nbytes, out) { code, kind, P11P_R_ONESHOT, 0, 0, nbytes, out, 0 }
#define UPDATE(code, kind, out) { code, kind, P11P_R_UPDATE, 0, 0, 1, out, 0 }
#define FINAL(code, kind, nbytes, out) { code, kind, P11P_R_FINAL, 0, 0, nbytes, out, 0 }

static CK_RV op(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh, const struct p11p_op_args *a)
{
	CK_RV rv = p11p_enter(); /* held throughout: C_Finalize waits for this call */

	if (rv != CKR_OK)
		return rv;
	rv = p11p_op_call(h, sh, a);
	p11p_leave();
	return rv;
}

static CK_RV init(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh, CK_MECHANISM_PTR m,
		  CK_OBJECT_HANDLE key)
{
	struct p11p_op_args a = { .mech = m, .key = key };

	return op(h, sh, &a);
}

static CK_RV in_out(CK_SESSION_HANDLE h, const struct p11p_op_shape *sh, CK_BYTE_PTR in,
		    CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	struct p11p_op_args a = { .in = { in, NULL }, .in_len = { in_len, 0 }, .out = out,
				  .out_len = out_len };

	return op(h, sh, &a);
}

/* ---- encrypt, decrypt ---- */

P11P_EXPORT CK_RV C_EncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	static const struct p11p_op_shape sh = INIT(P11P_FN_C_EncryptInit, P11P_K_ENCRYPT, 1);

	return init(h, &sh, m, k);
}

P11P_EXPORT CK_RV C_Encrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
			    CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = ONESHOT(P11P_FN_C_Encrypt, P11P_K_ENCRYPT, 1, 1);

	return in_out(h, &sh, in, n, out, out_len);
}

P11P_EXPORT CK_RV C_EncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n,
				  CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = UPDATE(P11P_FN_C_EncryptUpdate, P11P_K_ENCRYPT, 1);

	return in_out(h, &sh, in, n, out, out_len);
}

P11P_EXPORT CK_RV C_EncryptFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = FINAL(P11P_FN_C_EncryptFinal, P11P_K_ENCRYPT, 0, 1);

	return in_out(h, &sh, NULL, 0, out, out_len);
}

P11P_EXPORT CK_RV C_DecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	static const struct p11p_op_shape sh = INIT(P11P_FN_C_DecryptInit, P11P_K_DECRYPT, 1);

	return init(h, &sh, m, k);
}

P11P_EXPORT CK_RV C_Decrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
			    CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = ONESHOT(P11P_FN_C_Decrypt, P11P_K_DECRYPT, 1, 1);

	return in_out(h, &sh, in, n, out, out_len);
}

P11P_EXPORT CK_RV C_DecryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n,
				  CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = UPDATE(P11P_FN_C_DecryptUpdate, P11P_K_DECRYPT, 1);

	return in_out(h, &sh, in, n, out, out_len);
}

P11P_EXPORT CK_RV C_DecryptFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = FINAL(P11P_FN_C_DecryptFinal, P11P_K_DECRYPT, 0, 1);

	return in_out(h, &sh, NULL, 0, out, out_len);
}

/* ---- digest ---- */

P11P_EXPORT CK_RV C_DigestInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m)
{
	static const struct p11p_op_shape sh = INIT(P11P_FN_C_DigestInit, P11P_K_DIGEST, 0);

	return init(h, &sh, m, 0);
}

P11P_EXPORT CK_RV C_Digest(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
			   CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = ONESHOT(P11P_FN_C_Digest, P11P_K_DIGEST, 1, 1);

	return in_out(h, &sh, in, n, out, out_len);
}

P11P_EXPORT CK_RV C_DigestUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n)
{
	static const struct p11p_op_shape sh = UPDATE(P11P_FN_C_DigestUpdate, P11P_K_DIGEST, 0);

	return in_out(h, &sh, in, n, NULL, NULL);
}

/* Not on the data plane (@opaque: the daemon does not replay what follows it): a digest
 * running there moves to the daemon first. */
P11P_EXPORT CK_RV C_DigestKey(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE k)
{
	static const struct p11p_op_shape sh = {
		P11P_FN_C_DigestKey, P11P_K_DIGEST, P11P_R_UPDATE, 0, 1, 0, 0, 1 };
	struct p11p_op_args a = { .key = k };

	return op(h, &sh, &a);
}

P11P_EXPORT CK_RV C_DigestFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = FINAL(P11P_FN_C_DigestFinal, P11P_K_DIGEST, 0, 1);

	return in_out(h, &sh, NULL, 0, out, out_len);
}

/* ---- sign, verify, and with recovery ---- */

P11P_EXPORT CK_RV C_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	static const struct p11p_op_shape sh = INIT(P11P_FN_C_SignInit, P11P_K_SIGN, 1);

	return init(h, &sh, m, k);
}

P11P_EXPORT CK_RV C_Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
			 CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = ONESHOT(P11P_FN_C_Sign, P11P_K_SIGN, 1, 1);

	return in_out(h, &sh, in, n, out, out_len);
}

P11P_EXPORT CK_RV C_SignUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n)
{
	static const struct p11p_op_shape sh = UPDATE(P11P_FN_C_SignUpdate, P11P_K_SIGN, 0);

	return in_out(h, &sh, in, n, NULL, NULL);
}

P11P_EXPORT CK_RV C_SignFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh = FINAL(P11P_FN_C_SignFinal, P11P_K_SIGN, 0, 1);

	return in_out(h, &sh, NULL, 0, out, out_len);
}

P11P_EXPORT CK_RV C_SignRecoverInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	static const struct p11p_op_shape sh = INIT(P11P_FN_C_SignRecoverInit, P11P_K_SIGN_RECOVER, 1);

	return init(h, &sh, m, k);
}

P11P_EXPORT CK_RV C_SignRecover(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
				CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh =
		ONESHOT(P11P_FN_C_SignRecover, P11P_K_SIGN_RECOVER, 1, 1);

	return in_out(h, &sh, in, n, out, out_len);
}

P11P_EXPORT CK_RV C_VerifyInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	static const struct p11p_op_shape sh = INIT(P11P_FN_C_VerifyInit, P11P_K_VERIFY, 1);

	return init(h, &sh, m, k);
}

P11P_EXPORT CK_RV C_Verify(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR sig,
			   CK_ULONG sig_len)
{
	static const struct p11p_op_shape sh = ONESHOT(P11P_FN_C_Verify, P11P_K_VERIFY, 2, 0);
	struct p11p_op_args a = { .in = { in, sig }, .in_len = { n, sig_len } };

	return op(h, &sh, &a);
}

P11P_EXPORT CK_RV C_VerifyUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n)
{
	static const struct p11p_op_shape sh = UPDATE(P11P_FN_C_VerifyUpdate, P11P_K_VERIFY, 0);

	return in_out(h, &sh, in, n, NULL, NULL);
}

P11P_EXPORT CK_RV C_VerifyFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG sig_len)
{
	static const struct p11p_op_shape sh = FINAL(P11P_FN_C_VerifyFinal, P11P_K_VERIFY, 1, 0);

	return in_out(h, &sh, sig, sig_len, NULL, NULL);
}

P11P_EXPORT CK_RV C_VerifyRecoverInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k)
{
	static const struct p11p_op_shape sh =
		INIT(P11P_FN_C_VerifyRecoverInit, P11P_K_VERIFY_RECOVER, 1);

	return init(h, &sh, m, k);
}

P11P_EXPORT CK_RV C_VerifyRecover(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG sig_len,
				  CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	static const struct p11p_op_shape sh =
		ONESHOT(P11P_FN_C_VerifyRecover, P11P_K_VERIFY_RECOVER, 1, 1);

	return in_out(h, &sh, sig, sig_len, out, out_len);
}

/* ---- calls on two operations, and on all of them: through the daemon ---- */

static CK_RV dual_enter(CK_SESSION_HANDLE h, unsigned kinds)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	rv = p11p_ops_to_daemon(h, kinds);
	if (rv != CKR_OK)
		p11p_leave();
	return rv;
}

static CK_RV dual_leave(CK_SESSION_HANDLE h, unsigned kinds, CK_RV rv)
{
	p11p_ops_after(h, kinds, rv);
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_DigestEncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n,
					CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	unsigned kinds = BIT(P11P_K_DIGEST) | BIT(P11P_K_ENCRYPT);
	CK_RV rv = dual_enter(h, kinds);

	if (rv != CKR_OK)
		return rv;
	return dual_leave(h, kinds, p11p_wire_C_DigestEncryptUpdate(h, in, n, out, out_len));
}

P11P_EXPORT CK_RV C_DecryptDigestUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n,
					CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	unsigned kinds = BIT(P11P_K_DECRYPT) | BIT(P11P_K_DIGEST);
	CK_RV rv = dual_enter(h, kinds);

	if (rv != CKR_OK)
		return rv;
	return dual_leave(h, kinds, p11p_wire_C_DecryptDigestUpdate(h, in, n, out, out_len));
}

P11P_EXPORT CK_RV C_SignEncryptUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n,
				      CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	unsigned kinds = BIT(P11P_K_SIGN) | BIT(P11P_K_ENCRYPT);
	CK_RV rv = dual_enter(h, kinds);

	if (rv != CKR_OK)
		return rv;
	return dual_leave(h, kinds, p11p_wire_C_SignEncryptUpdate(h, in, n, out, out_len));
}

P11P_EXPORT CK_RV C_DecryptVerifyUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR in, CK_ULONG n,
					CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
	unsigned kinds = BIT(P11P_K_DECRYPT) | BIT(P11P_K_VERIFY);
	CK_RV rv = dual_enter(h, kinds);

	if (rv != CKR_OK)
		return rv;
	return dual_leave(h, kinds, p11p_wire_C_DecryptVerifyUpdate(h, in, n, out, out_len));
}

/* The state it sets replaces the session's operations: those of the data plane move
 * to the daemon first, and what it starts the library does not know (their calls go
 * through the daemon, or meet the member session's state on the data plane). */
P11P_EXPORT CK_RV C_SetOperationState(CK_SESSION_HANDLE h, CK_BYTE_PTR state, CK_ULONG n,
				      CK_OBJECT_HANDLE enc, CK_OBJECT_HANDLE auth)
{
	CK_RV rv = dual_enter(h, ALL_KINDS);

	if (rv != CKR_OK)
		return rv;
	rv = p11p_wire_C_SetOperationState(h, state, n, enc, auth);
	if (rv == CKR_OK)
		p11p_ops_after(h, ALL_KINDS, CKR_OPERATION_NOT_INITIALIZED); /* forgotten here */
	p11p_leave();
	return rv;
}

/* ---- random, attributes, session info ---- */

P11P_EXPORT CK_RV C_GenerateRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG n)
{
	struct p11p_call c;
	struct p11p_bound b;
	CK_RV rv = p11p_enter();
	int why;

	if (rv != CKR_OK)
		return rv;
	if (out != NULL && n <= P11P_PLANE_MAX_DATA && p11p_plane_bound(h, &b, 1)) {
		p11p_plane_begin(&c, P11P_FN_C_GenerateRandom, 2);
		p11p_put_ulong(&c, b.id);
		p11p_put_out_random(&c, out, n);
		if (p11p_plane_run(&c, &b, 1, &why) == 0) {
			p11p_get_out_random(&c, out, n);
			rv = p11p_call_finish(&c);
			p11p_leave();
			return rv;
		}
		p11p_codec_end(&c);
		p11p_plane_fell_back(h, why);
	}
	rv = p11p_wire_C_GenerateRandom(h, out, n);
	p11p_plane_counted(h, rv);
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_SeedRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR seed, CK_ULONG n)
{
	struct p11p_call c;
	struct p11p_bound b;
	CK_RV rv = p11p_enter();
	int why;

	if (rv != CKR_OK)
		return rv;
	if ((seed == NULL || n <= P11P_PLANE_MAX_DATA) && p11p_plane_bound(h, &b, 1)) {
		p11p_plane_begin(&c, P11P_FN_C_SeedRandom, 2);
		p11p_put_ulong(&c, b.id);
		p11p_put_bytes(&c, seed, n);
		if (p11p_plane_run(&c, &b, 0, &why) == 0) {
			rv = p11p_call_finish(&c);
			p11p_leave();
			return rv;
		}
		p11p_codec_end(&c);
		p11p_plane_fell_back(h, why);
	}
	rv = p11p_wire_C_SeedRandom(h, seed, n);
	p11p_plane_counted(h, rv);
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE obj,
				      CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	struct p11p_call c;
	struct p11p_bound b;
	CK_OBJECT_HANDLE m;
	CK_RV rv = p11p_enter();
	int why;

	if (rv != CKR_OK)
		return rv;
	if (p11p_plane_bound(h, &b, 1) && p11p_plane_object(h, &b, obj, &m, 0) == 0) {
		p11p_plane_begin(&c, P11P_FN_C_GetAttributeValue, 3);
		p11p_put_ulong(&c, b.id);
		p11p_put_ulong(&c, m);
		p11p_put_template_get(&c, t, n);
		if (p11p_plane_run(&c, &b, 1, &why) == 0) {
			p11p_get_template_get(&c, t, n);
			rv = p11p_call_finish(&c);
			p11p_leave();
			return rv;
		}
		p11p_codec_end(&c);
		p11p_plane_fell_back(h, why);
	}
	rv = p11p_wire_C_GetAttributeValue(h, obj, t, n);
	p11p_plane_counted(h, rv);
	p11p_leave();
	return rv;
}

/* The member session's information, with the virtual slot (the daemon's answer too). */
P11P_EXPORT CK_RV C_GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR info)
{
	struct p11p_call c;
	struct p11p_bound b;
	CK_RV rv = p11p_enter();
	int why;

	if (rv != CKR_OK)
		return rv;
	if (p11p_plane_bound(h, &b, 1)) {
		p11p_plane_begin(&c, P11P_FN_C_GetSessionInfo, 2);
		p11p_put_ulong(&c, b.id);
		p11p_put_out_struct(&c, info);
		if (p11p_plane_run(&c, &b, 1, &why) == 0) {
			p11p_get_out_session_info(&c, info);
			rv = p11p_call_finish(&c);
			if (rv == CKR_OK && info != NULL)
				info->slotID = b.slot;
			p11p_leave();
			return rv;
		}
		p11p_codec_end(&c);
		p11p_plane_fell_back(h, why);
	}
	rv = p11p_wire_C_GetSessionInfo(h, info);
	p11p_plane_counted(h, rv);
	p11p_leave();
	return rv;
}

/* ---- logout and destroy: what the library remembers goes with them (C_CloseSession:
 * sessions.c) ---- */

/* A logout ends the application's handles of private objects (the daemon forgets them,
 * as the token makes them unreachable): the member handles remembered here expire. */
P11P_EXPORT CK_RV C_Logout(CK_SESSION_HANDLE h)
{
	CK_RV rv = p11p_enter();
	CK_SLOT_ID slot;

	if (rv != CKR_OK)
		return rv;
	p11p_plane_settle(h); /* as the generated stubs do (client/gen.py) */
	rv = p11p_wire_C_Logout(h);
	if (rv == CKR_OK)
		p11p_plane_destroyed();
	if (rv == CKR_OK && p11p_sessions_slot(h, &slot))
		p11p_kept_logout(slot); /* the PIN kept for a restarted daemon goes */
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_DestroyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE obj)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	p11p_plane_settle(h); /* as C_Logout: the key may be an operation's */
	p11p_plane_settle_key(obj); /* an operation of another session's too */
	rv = p11p_wire_C_DestroyObject(h, obj);
	if (rv == CKR_OK)
		p11p_plane_destroyed();
	p11p_leave();
	return rv;
}
