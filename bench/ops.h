/* p11bench — the operations a run can time, one function per operation. */
#ifndef P11BENCH_OPS_H
#define P11BENCH_OPS_H

#include "keys.h"

/* What every thread reads and none writes, made once before the threads start by the
 * operation's `prepare` (on the main, logged-in session): the data and the signature
 * that ecdsa-p256-verify checks. */
typedef struct bench_fixture {
	unsigned char data[32];
	unsigned char signature[64];
	CK_ULONG signature_len;
} bench_fixture;

/* What one thread works with: its own session, the shared key handles, its buffers. */
typedef struct bench_ctx {
	CK_FUNCTION_LIST_PTR f;
	CK_SLOT_ID slot;
	CK_SESSION_HANDLE session;
	const bench_keys *keys;
	const bench_fixture *fixture;
	unsigned long long counter; /* makes each IV unique */
	unsigned char input[1024];
	unsigned char output[2048];
} bench_ctx;

typedef struct bench_op {
	const char *name;
	unsigned keys; /* BENCH_KEY_* bits it needs */
	/* One complete operation. CKR_OK, or the first failing CK_RV with the function's
	 * name in `*what`; BENCH_BAD_OUTPUT when a call succeeded with a wrong output. */
	CK_RV (*run)(bench_ctx *ctx, const char **what);
	/* NULL, or what must exist before the run, made untimed on session `s`; CKR_OK, or
	 * the failing CK_RV with the function's name in `*what`. */
	CK_RV (*prepare)(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, const bench_keys *keys,
			 bench_fixture *fixture, const char **what);
} bench_op;

/* After a failed operation: closes the thread's session (an operation may still be active
 * in it) and opens a fresh one on the same slot; CK_INVALID_HANDLE if that fails. */
void bench_ctx_reopen(bench_ctx *ctx);

/* The operation called `name`, or NULL. */
const bench_op *bench_op_find(const char *name);

/* The names of all operations, comma-separated (for usage text). */
const char *bench_op_names(void);

#endif
