/* p11p fuzzing — libFuzzer harness for the client library's reply decoding: whatever a
 * bad or malicious daemon answers, the application's call returns a CK_RV and never
 * reads or writes outside what it was given.
 *
 * It links the client's codec, stubs, searches (find.c) and transport with a link
 * (client/link.h) whose round trip answers with the fuzzer's bytes. An input is:
 *   byte 0          which call: every Cryptoki function that travels (the calls are
 *                   generated from protocol/functions.spec into client_calls.c), a
 *                   search kept in the library, the hello over a socket pair, or the
 *                   replies in a data-plane connection's mailbox (client/box.c)
 *   bytes 1..12     the shapes of the application's arguments: NULL or a buffer,
 *                   capacities, templates to read back (nested ones too), mechanisms
 *   the rest        the reply frame body (for the hello: the raw bytes on the socket)
 * Output buffers are malloc'd to their exact capacity, so AddressSanitizer sees any
 * byte written past them; a few invariants are checked on top (an answer never claims
 * more than the capacity it filled). */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "box.h"
#include "call.h"
#include "find.h"
#include "gen/versions.h"
#include "link.h"
#include "sessions.h"
#include "state.h"
#include "transport.h"
#include "client_fuzz.h"

#define SELECTORS 12

struct p11p_state p11p_state; /* find.c takes its lock */

static const uint8_t *reply_data;
static size_t reply_size;
static CK_RV transport_rv;
static int connection;

/* ---- the link: every round trip is answered with the input's reply bytes ---- */

CK_RV p11p_enter(void)
{
	return CKR_OK;
}

void p11p_leave(void)
{
}

void p11p_release(void *conn, int healthy)
{
	(void)conn;
	(void)healthy;
}

/* No data plane here (client/direct.c and plane_*.c are not linked): nothing to move to
 * the daemon before a search. */
void p11p_plane_settle(CK_SESSION_HANDLE h)
{
	(void)h;
}

CK_RV p11p_roundtrip(unsigned long code, char *frame, size_t len, char **reply,
		     size_t *reply_len, void **conn)
{
	(void)code;
	(void)frame;
	(void)len;
	if (transport_rv != CKR_OK)
		return transport_rv;
	/* exactly the bytes that came, in a block of their own size */
	*reply = malloc(reply_size ? reply_size : 1);
	if (*reply == NULL)
		return CKR_HOST_MEMORY;
	memcpy(*reply, reply_data, reply_size);
	*reply_len = reply_size;
	*conn = &connection;
	return CKR_OK;
}

/* ---- the application's arguments, shaped by selector bytes ---- */

static unsigned z_byte(struct fz *z)
{
	return z->pos < z->nsel ? z->sel[z->pos++] : 0;
}

static void *z_keep(struct fz *z, size_t size)
{
	void *p = malloc(size ? size : 1);

	assert(p != NULL && z->nkeep < FZ_KEEP);
	memset(p, 0xA5, size ? size : 1); /* not zero: a client that reads it would show */
	z->keep[z->nkeep++] = p;
	return p;
}

static void z_free(struct fz *z)
{
	for (size_t i = 0; i < z->nkeep; i++)
		free(z->keep[i]);
	z->nkeep = 0;
}

CK_ULONG fz_ulong(struct fz *z)
{
	unsigned b = z_byte(z);

	return b < 0xF0 ? b : b == 0xFF ? CK_UNAVAILABLE_INFORMATION : (CK_ULONG)1 << (b - 0xC0);
}

CK_BBOOL fz_bbool(struct fz *z)
{
	return (CK_BBOOL)(z_byte(z) & 1);
}

CK_BYTE_PTR fz_in_bytes(struct fz *z, CK_ULONG *len)
{
	unsigned b = z_byte(z);

	*len = b & 0x3F;
	if (b & 0x80)
		return NULL; /* NULL with a length, or nil */
	return z_keep(z, *len);
}

CK_UTF8CHAR_PTR fz_label(struct fz *z)
{
	return z_byte(z) & 1 ? NULL : z_keep(z, 32);
}

/* A capacity, and a buffer of exactly that size or NULL (a length query). */
void *fz_out(struct fz *z, CK_ULONG *cap, size_t item)
{
	unsigned b = z_byte(z);

	*cap = b & 0x7F;
	if (b & 0x80)
		return NULL;
	return z_keep(z, *cap * item);
}

void *fz_struct(struct fz *z, size_t size)
{
	return z_byte(z) & 1 ? NULL : z_keep(z, size);
}

static CK_ATTRIBUTE_TYPE z_type(struct fz *z)
{
	static const CK_ATTRIBUTE_TYPE types[] = {
		CKA_VALUE, CKA_LABEL, CKA_CLASS, CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE,
		CKA_DERIVE_TEMPLATE, CKA_ALLOWED_MECHANISMS, CKA_ID,
	};
	unsigned b = z_byte(z);

	return b < 0x80 ? types[b % (sizeof types / sizeof types[0])] : b;
}

static int nested(CK_ATTRIBUTE_TYPE t)
{
	return t == CKA_WRAP_TEMPLATE || t == CKA_UNWRAP_TEMPLATE || t == CKA_DERIVE_TEMPLATE;
}

/* A template for C_GetAttributeValue: per attribute NULL (a length query) or a buffer of
 * some capacity; a nested template's buffer is an array of attributes of its own. */
static void z_get_attrs(struct fz *z, CK_ATTRIBUTE *t, CK_ULONG n, int depth)
{
	for (CK_ULONG i = 0; i < n; i++) {
		unsigned b = z_byte(z);

		t[i].type = z_type(z);
		t[i].pValue = NULL;
		t[i].ulValueLen = b & 0x3F;
		if (b & 0x80)
			continue;
		if (nested(t[i].type)) {
			/* as PKCS#11 has it: an array of attributes, set up for what comes back
			 * (deeper than the client goes, or a length that is no multiple of the
			 * attribute's size, now and then) */
			CK_ULONG inner = depth < 5 ? b & 3 : 0;
			CK_ATTRIBUTE *a = z_keep(z, inner * sizeof *a);

			z_get_attrs(z, a, inner, depth + 1);
			t[i].pValue = a;
			t[i].ulValueLen = inner * sizeof *a + (b & 0x40 ? (b >> 2) & 7 : 0);
		} else {
			t[i].pValue = z_keep(z, t[i].ulValueLen);
		}
	}
}

CK_ATTRIBUTE_PTR fz_get_template(struct fz *z, CK_ULONG *n)
{
	unsigned b = z_byte(z);
	CK_ATTRIBUTE *t;

	*n = b & 7;
	if (b & 0x80)
		return NULL;
	t = z_keep(z, *n * sizeof *t);
	z_get_attrs(z, t, *n, 0);
	return t;
}

CK_ATTRIBUTE_PTR fz_in_template(struct fz *z, CK_ULONG *n)
{
	static CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
	static CK_BBOOL yes = CK_TRUE;
	static CK_ATTRIBUTE inner[] = { { CKA_CLASS, &cls, sizeof cls } };
	static CK_ATTRIBUTE t[] = {
		{ CKA_CLASS, &cls, sizeof cls }, { CKA_TOKEN, &yes, sizeof yes },
		{ CKA_LABEL, NULL, 0 }, { CKA_WRAP_TEMPLATE, inner, sizeof inner },
	};
	unsigned b = z_byte(z);

	*n = b % 5;
	return b & 0x80 ? NULL : t;
}

CK_MECHANISM_PTR fz_mechanism(struct fz *z)
{
	static CK_BYTE iv[16];
	static CK_GCM_PARAMS gcm = { iv, 12, 96, iv, 4, 128 };
	static CK_RSA_PKCS_OAEP_PARAMS oaep = { CKM_SHA256, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED, iv, 3 };
	static CK_OBJECT_HANDLE key = 7;
	static CK_MECHANISM mechs[] = {
		{ CKM_SHA256, NULL, 0 }, { CKM_AES_CBC_PAD, iv, sizeof iv },
		{ CKM_AES_GCM, &gcm, sizeof gcm }, { CKM_RSA_PKCS_OAEP, &oaep, sizeof oaep },
		{ CKM_CONCATENATE_BASE_AND_KEY, &key, sizeof key }, { CKM_AES_GCM, &gcm, 7 },
		{ CKM_ECDSA, NULL, 0 },
	};
	unsigned b = z_byte(z);

	return b & 0x80 ? NULL : &mechs[b % (sizeof mechs / sizeof mechs[0])];
}

/* ---- invariants on what came back ---- */

void fz_check_len(CK_RV rv, const void *p, CK_ULONG cap, CK_ULONG len)
{
	if (rv == CKR_OK && p != NULL && len > cap)
		__builtin_trap(); /* "written" more than the buffer holds */
}

/* ---- the hello over a socket pair: framing and the welcome check ---- */

static void hello(const uint8_t *data, size_t size)
{
	static const unsigned char ctx[P11P_CTX_SIZE];
	struct p11p_welcome w;
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) != 0)
		return;
	if (size > 0 && write(sv[1], data, size) != (ssize_t)size) {
		close(sv[0]);
		close(sv[1]);
		return;
	}
	shutdown(sv[1], SHUT_WR); /* then EOF: a frame that says more never completes */
	if (p11p_hello(sv[0], ctx, p11p_deadline(1000), &w) == CKR_OK) {
		/* agreed on a version of ours and on features we know, and no reason to fail */
		if (w.version < P11P_PROTOCOL_MIN || w.version > P11P_PROTOCOL_MAX ||
		    (P11P_FEATURE_COUNT < 32 && w.features >> P11P_FEATURE_COUNT) || w.why[0])
			__builtin_trap();
	} else if (memchr(w.why, '\0', sizeof w.why) == NULL) {
		__builtin_trap(); /* the reason for the notice is a string */
	}
	close(sv[0]);
	close(sv[1]);
}

/* ---- a mailbox's replies: 4 bytes of the length the helper claims, then the area ---- */

static void box_replies(const uint8_t *data, size_t size, int pair)
{
	static struct p11p_box box;
	char *a = NULL, *b = NULL;
	size_t alen = 0, blen = 0, n;
	uint32_t claimed;

	if (size < 4)
		return;
	claimed = (uint32_t)data[0] << 24 | (uint32_t)data[1] << 16 | (uint32_t)data[2] << 8 | data[3];
	n = size - 4 < P11P_BOX_AREA ? size - 4 : P11P_BOX_AREA;
	memset(box.rep, 0xA5, sizeof box.rep);
	memcpy(box.rep, data + 4, n);
	if (p11p_box_take(&box, claimed, &a, &alen, pair ? &b : NULL, &blen) == 0) {
		/* whole frames, exactly the bytes claimed, within the area */
		if (claimed > P11P_BOX_AREA || a == NULL || (pair && b == NULL) ||
		    4 + alen + (pair ? 4 + blen : 0) != claimed)
			__builtin_trap();
	} else if (a != NULL || b != NULL) {
		__builtin_trap();
	}
	free(a);
	free(b);
}

/* ---- searches kept in the library: init (FIND_ALL), batches, final ---- */

static void search(struct fz *z)
{
	CK_ULONG n, count = 0, max;
	CK_ATTRIBUTE_PTR t = fz_in_template(z, &n);
	CK_OBJECT_HANDLE *h;
	CK_RV rv;

	rv = C_FindObjectsInit(1, t, n);
	for (int i = 0; i < 3; i++) {
		h = fz_out(z, &max, sizeof *h);
		rv = C_FindObjects(1, h, max, &count);
		if (rv == CKR_OK && count > max)
			__builtin_trap();
	}
	(void)C_FindObjectsFinal(1);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	if (p11p_lock_init(&p11p_state.lock, NULL) != CKR_OK)
		abort();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fz z = { 0 };
	unsigned which;

	if (size < 1)
		return 0;
	which = data[0];
	if (which >= 0xF0) {
		hello(data + 1, size - 1);
		return 0;
	}
	if (which >= 0xE0 && which < 0xE8) {
		box_replies(data + 1, size - 1, which & 1);
		return 0;
	}
	z.sel = data + 1;
	z.nsel = size - 1 < SELECTORS ? size - 1 : SELECTORS;
	reply_data = data + 1 + z.nsel;
	reply_size = size - 1 - z.nsel;
	transport_rv = which >= 0xE8 ? (which & 1 ? P11P_RV_NO_DAEMON : CKR_DEVICE_ERROR) : CKR_OK;
	p11p_find_reset();
	which %= fz_ncalls + 1;
	if (which == fz_ncalls)
		search(&z);
	else
		fz_call(&z, which);
	z_free(&z);
	p11p_find_reset();
	return 0;
}

/* No sessions of the library's here (client/sessions.c is not linked): a session
 * argument is put as it is. */
void p11p_put_session(struct p11p_call *c, CK_SESSION_HANDLE h)
{
	p11p_put_ulong(c, h);
}
