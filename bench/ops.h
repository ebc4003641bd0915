/* p11bench — the operations a run can time, one function per operation. */
#ifndef P11BENCH_OPS_H
#define P11BENCH_OPS_H

#include "keys.h"

/* What one thread works with: its own session, the shared key handles, its buffers. */
typedef struct bench_ctx {
	CK_FUNCTION_LIST_PTR f;
	CK_SLOT_ID slot;
	CK_SESSION_HANDLE session;
	const bench_keys *keys;
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
} bench_op;

/* After a failed operation: closes the thread's session (an operation may still be active
 * in it) and opens a fresh one on the same slot; CK_INVALID_HANDLE if that fails. */
void bench_ctx_reopen(bench_ctx *ctx);

/* The operation called `name`, or NULL. */
const bench_op *bench_op_find(const char *name);

/* The names of all operations, comma-separated (for usage text). */
const char *bench_op_names(void);

#endif
