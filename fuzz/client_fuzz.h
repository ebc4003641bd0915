/* p11p fuzzing — what the client harness (client_reply_fuzzer.c) and its generated call
 * table (client_calls.c, made by gen_client_calls.py from protocol/functions.spec)
 * share: the argument shapers and the table. */
#ifndef P11P_CLIENT_FUZZ_H
#define P11P_CLIENT_FUZZ_H

#include <stddef.h>
#include <stdint.h>

#include "p11p-extra.h"

#define FZ_KEEP 256

/* Selector bytes that shape the application's arguments, and what was allocated. */
struct fz {
	const uint8_t *sel;
	size_t nsel, pos;
	void *keep[FZ_KEEP];
	size_t nkeep;
};

CK_ULONG fz_ulong(struct fz *z);
CK_BBOOL fz_bbool(struct fz *z);
CK_BYTE_PTR fz_in_bytes(struct fz *z, CK_ULONG *len);
CK_UTF8CHAR_PTR fz_label(struct fz *z);
void *fz_out(struct fz *z, CK_ULONG *cap, size_t item);
void *fz_struct(struct fz *z, size_t size);
CK_ATTRIBUTE_PTR fz_get_template(struct fz *z, CK_ULONG *n);
CK_ATTRIBUTE_PTR fz_in_template(struct fz *z, CK_ULONG *n);
CK_MECHANISM_PTR fz_mechanism(struct fz *z);
void fz_check_len(CK_RV rv, const void *p, CK_ULONG cap, CK_ULONG len);

/* The generated table: call number i (0 <= i < fz_ncalls) with shaped arguments. */
extern const unsigned fz_ncalls;
CK_RV fz_call(struct fz *z, unsigned i);

#endif
