/* p11bench — the operations a run can time, one function per operation. Each checks
 * every CK_RV and the size of what it got back. */
#include <string.h>

#include "ops.h"

#define FAIL(fn) do { *what = (fn); return rv; } while (0)
#define CALL(fn, args) do { rv = ctx->f->fn args; if (rv != CKR_OK) FAIL(#fn); } while (0)
#define EXPECT(cond, fn) do { if (!(cond)) { *what = (fn); return BENCH_BAD_OUTPUT; } } while (0)

static CK_RV op_random(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CALL(C_GenerateRandom, (ctx->session, ctx->output, 32));
	return CKR_OK;
}

/* C_GetSessionInfo of the thread's session: a call that never reaches a crypto engine.
 * The threads' sessions are read-write and the application is logged in. */
static CK_RV op_session_info(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_SESSION_INFO info;
	CALL(C_GetSessionInfo, (ctx->session, &info));
	EXPECT(info.slotID == ctx->slot && info.state == CKS_RW_USER_FUNCTIONS &&
	       (info.flags & CKF_RW_SESSION), "C_GetSessionInfo");
	return CKR_OK;
}

static CK_RV op_sha256(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_MECHANISM mech = { CKM_SHA256, NULL, 0 };
	CK_ULONG len = sizeof(ctx->output);
	CALL(C_DigestInit, (ctx->session, &mech));
	CALL(C_Digest, (ctx->session, ctx->input, 1024, ctx->output, &len));
	EXPECT(len == 32, "C_Digest");
	return CKR_OK;
}

/* The same kilobyte in four parts: C_DigestInit, 4 × C_DigestUpdate of 256 bytes,
 * C_DigestFinal. */
static CK_RV op_sha256_parts(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_MECHANISM mech = { CKM_SHA256, NULL, 0 };
	CK_ULONG len = sizeof(ctx->output);
	CALL(C_DigestInit, (ctx->session, &mech));
	for (size_t part = 0; part < 4; part++)
		CALL(C_DigestUpdate, (ctx->session, ctx->input + part * 256, 256));
	CALL(C_DigestFinal, (ctx->session, ctx->output, &len));
	EXPECT(len == 32, "C_DigestFinal");
	return CKR_OK;
}

static void next_iv(bench_ctx *ctx, unsigned char *iv, size_t len)
{
	memset(iv, 0, len);
	unsigned long long c = ++ctx->counter;
	for (size_t i = 0; i < sizeof(c) && i < len; i++)
		iv[len - 1 - i] = (unsigned char)(c >> (8 * i));
}

static CK_RV op_aes_gcm(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	unsigned char iv[12];
	next_iv(ctx, iv, sizeof(iv));
	CK_GCM_PARAMS params = { .pIv = iv, .ulIvLen = sizeof(iv), .ulIvBits = 96,
				 .pAAD = NULL, .ulAADLen = 0, .ulTagBits = 128 };
	CK_MECHANISM mech = { CKM_AES_GCM, &params, sizeof(params) };
	CK_ULONG len = sizeof(ctx->output);
	CALL(C_EncryptInit, (ctx->session, &mech, ctx->keys->aes));
	CALL(C_Encrypt, (ctx->session, ctx->input, 1024, ctx->output, &len));
	EXPECT(len == 1024 + 16, "C_Encrypt");
	return CKR_OK;
}

static CK_RV op_aes_cbc(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	unsigned char iv[16];
	next_iv(ctx, iv, sizeof(iv));
	CK_MECHANISM mech = { CKM_AES_CBC, iv, sizeof(iv) };
	CK_ULONG len = sizeof(ctx->output);
	CALL(C_EncryptInit, (ctx->session, &mech, ctx->keys->aes));
	CALL(C_Encrypt, (ctx->session, ctx->input, 1024, ctx->output, &len));
	EXPECT(len == 1024, "C_Encrypt");
	return CKR_OK;
}

/* The same data and calls as aes-gcm-1k, with CKM_AES_ECB (no parameter): what p11-kit's
 * remoting can carry, to compare aes-gcm-1k through p11p with. */
static CK_RV op_aes_ecb(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_MECHANISM mech = { CKM_AES_ECB, NULL, 0 };
	CK_ULONG len = sizeof(ctx->output);
	CALL(C_EncryptInit, (ctx->session, &mech, ctx->keys->aes));
	CALL(C_Encrypt, (ctx->session, ctx->input, 1024, ctx->output, &len));
	EXPECT(len == 1024, "C_Encrypt");
	return CKR_OK;
}

static CK_RV op_ecdsa(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
	CK_ULONG len = sizeof(ctx->output);
	CALL(C_SignInit, (ctx->session, &mech, ctx->keys->ec));
	CALL(C_Sign, (ctx->session, ctx->input, 32, ctx->output, &len));
	EXPECT(len == 64, "C_Sign");
	return CKR_OK;
}

/* ecdsa-p256-verify's fixture: a signature of fixed data by bench-ec, made once. */
static CK_RV prepare_ecdsa_verify(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s,
				  const bench_keys *keys, bench_fixture *fx, const char **what)
{
	CK_RV rv;
	CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
	for (size_t i = 0; i < sizeof(fx->data); i++)
		fx->data[i] = (unsigned char)(0xa5 ^ (i * 13));
	fx->signature_len = sizeof(fx->signature);
	rv = f->C_SignInit(s, &mech, keys->ec);
	if (rv != CKR_OK)
		FAIL("C_SignInit (preparing the signature)");
	rv = f->C_Sign(s, fx->data, sizeof(fx->data), fx->signature, &fx->signature_len);
	if (rv != CKR_OK)
		FAIL("C_Sign (preparing the signature)");
	if (fx->signature_len != 64) {
		*what = "C_Sign (preparing the signature)";
		return BENCH_BAD_OUTPUT;
	}
	return CKR_OK;
}

/* C_VerifyInit(CKM_ECDSA, the public key) + C_Verify of the fixture's valid signature. */
static CK_RV op_ecdsa_verify(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
	const bench_fixture *fx = ctx->fixture;
	CALL(C_VerifyInit, (ctx->session, &mech, ctx->keys->ec_pub));
	CALL(C_Verify, (ctx->session, (CK_BYTE_PTR)fx->data, sizeof(fx->data),
			(CK_BYTE_PTR)fx->signature, fx->signature_len));
	return CKR_OK;
}

static CK_RV op_rsa(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_MECHANISM mech = { CKM_SHA256_RSA_PKCS, NULL, 0 };
	CK_ULONG len = sizeof(ctx->output);
	CALL(C_SignInit, (ctx->session, &mech, ctx->keys->rsa));
	CALL(C_Sign, (ctx->session, ctx->input, 32, ctx->output, &len));
	EXPECT(len == 256, "C_Sign");
	return CKR_OK;
}

/* ECDSA the way many applications call it: ask the length with a NULL buffer first. */
static CK_RV op_sign_twocall(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
	CK_ULONG len = 0;
	CALL(C_SignInit, (ctx->session, &mech, ctx->keys->ec));
	CALL(C_Sign, (ctx->session, ctx->input, 32, NULL, &len));
	EXPECT(len >= 64 && len <= sizeof(ctx->output), "C_Sign(NULL)");
	CALL(C_Sign, (ctx->session, ctx->input, 32, ctx->output, &len));
	EXPECT(len == 64, "C_Sign");
	return CKR_OK;
}

static CK_RV op_find(bench_ctx *ctx, const char **what)
{
	CK_OBJECT_HANDLE key;
	CK_RV rv = bench_find_one(ctx->f, ctx->session, CKO_PRIVATE_KEY, BENCH_LABEL_EC, &key, what);
	if (rv != CKR_OK)
		return rv;
	EXPECT(key != CK_INVALID_HANDLE, "C_FindObjects");
	return CKR_OK;
}

/* A session of its own, opened and closed; the thread's session stays open (and with it
 * the application's login). */
static CK_RV op_open_close(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
	CALL(C_OpenSession, (ctx->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s));
	EXPECT(s != CK_INVALID_HANDLE, "C_OpenSession");
	CALL(C_CloseSession, (s));
	return CKR_OK;
}

/* The same with one call on the new session (its first call: a proxy that opens
 * sessions lazily pays for the open there). */
static CK_RV op_open_use_close(bench_ctx *ctx, const char **what)
{
	CK_RV rv;
	CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
	CALL(C_OpenSession, (ctx->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s));
	EXPECT(s != CK_INVALID_HANDLE, "C_OpenSession");
	rv = ctx->f->C_GenerateRandom(s, ctx->output, 32);
	if (rv != CKR_OK) {
		ctx->f->C_CloseSession(s); /* not left open by a failed run */
		FAIL("C_GenerateRandom");
	}
	CALL(C_CloseSession, (s));
	return CKR_OK;
}

void bench_ctx_reopen(bench_ctx *ctx)
{
	ctx->f->C_CloseSession(ctx->session); /* errors ignored: it may already be gone */
	if (ctx->f->C_OpenSession(ctx->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
				  &ctx->session) != CKR_OK)
		ctx->session = CK_INVALID_HANDLE;
}

static const bench_op ops[] = {
	{ "random-32", 0, op_random, NULL },
	{ "session-info", 0, op_session_info, NULL },
	{ "sha256-1k", 0, op_sha256, NULL },
	{ "sha256-4x256", 0, op_sha256_parts, NULL },
	{ "aes-gcm-1k", BENCH_KEY_AES, op_aes_gcm, NULL },
	{ "aes-cbc-1k", BENCH_KEY_AES, op_aes_cbc, NULL },
	{ "aes-ecb-1k", BENCH_KEY_AES, op_aes_ecb, NULL },
	{ "ecdsa-p256-sign", BENCH_KEY_EC, op_ecdsa, NULL },
	{ "ecdsa-p256-verify", BENCH_KEY_EC | BENCH_KEY_EC_PUB, op_ecdsa_verify,
	  prepare_ecdsa_verify },
	{ "rsa2048-sign", BENCH_KEY_RSA, op_rsa, NULL },
	{ "sign-twocall", BENCH_KEY_EC, op_sign_twocall, NULL },
	{ "open-close", 0, op_open_close, NULL },
	{ "open-use-close", 0, op_open_use_close, NULL },
	{ "find", BENCH_KEY_EC, op_find, NULL },
};

const bench_op *bench_op_find(const char *name)
{
	for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
		if (strcmp(ops[i].name, name) == 0)
			return &ops[i];
	return NULL;
}

const char *bench_op_names(void)
{
	return "random-32, session-info, sha256-1k, sha256-4x256, aes-gcm-1k, aes-cbc-1k, "
	       "aes-ecb-1k, ecdsa-p256-sign, ecdsa-p256-verify, rsa2048-sign, sign-twocall, "
	       "open-close, open-use-close, find";
}
