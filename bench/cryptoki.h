/* p11bench — loading a PKCS#11 module, finding a token by label, naming return codes. */
#ifndef P11BENCH_CRYPTOKI_H
#define P11BENCH_CRYPTOKI_H

#include <stddef.h>
#include <p11-kit/pkcs11.h>

/* A result code outside Cryptoki's range: the call said CKR_OK but its output was wrong. */
#define BENCH_BAD_OUTPUT (CKR_VENDOR_DEFINED | 0x0badUL)

typedef struct bench_module {
	void *handle;
	CK_FUNCTION_LIST_PTR f;
} bench_module;

/* dlopen()s `path`, gets its function list and calls C_Initialize (OS locking).
 * On failure returns a CK_RV other than CKR_OK and names the failing step in `*what`. */
CK_RV bench_module_load(const char *path, bench_module *m, const char **what);

/* C_Finalize, then dlclose; returns what C_Finalize returned. */
CK_RV bench_module_unload(bench_module *m);

/* The slot whose token's label is `label` (space-padded in CK_TOKEN_INFO).
 * CKR_TOKEN_NOT_PRESENT when no token has it. */
CK_RV bench_find_slot(CK_FUNCTION_LIST_PTR f, const char *label, CK_SLOT_ID *slot,
		      const char **what);

/* Opens a read-write session on `slot` and logs the user in (already logged in is fine). */
CK_RV bench_open_logged_in(CK_FUNCTION_LIST_PTR f, CK_SLOT_ID slot, const char *pin,
			   CK_SESSION_HANDLE *session, const char **what);

/* "CKR_DEVICE_ERROR", or "CKR_0x..." written into `buf` for codes without a name here. */
const char *bench_rv_name(CK_RV rv, char *buf, size_t len);

#endif
