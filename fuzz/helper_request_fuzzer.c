/* p11p fuzzing — libFuzzer harness for the helper's direct-path codec (helper/fast_codec.c
 * and the calls generated into helper/gen/fast_calls.c): whatever a hostile client
 * sends on the helper's socket, the helper answers one well-formed reply or closes the
 * connection, never reads or writes outside what it was given, never hands the module
 * a request it could not decode, and counts every call it lets in out again.
 *
 * The codec runs against a fake module (a CK_FUNCTION_LIST of the data-plane
 * functions) that reads every input it is handed to its full length and writes every
 * output buffer up to its capacity, so AddressSanitizer sees a length that lies; the
 * lengths it reports back are chosen by the input, lies included (more than the
 * capacity, CK_UNAVAILABLE_INFORMATION). An input is:
 *   byte 0   the module's CK_RV (an index into a few that matter)
 *   byte 1   how it reports lengths: exact, its own, past the capacity, unavailable
 *   byte 2   the binding: let in, revoked, or the module finalizing (bits 0-1); bit 7:
 *            the rest is a mailbox request's copy (protocol/p11p-box.h), frames of a
 *            4-byte header (CPU hint, length in 24 bits) and a body each, taken apart
 *            by p11p_fast_frame and served one after another as the helper does (bytes
 *            left that are no whole frame: the connection closes)
 *   byte 3   how many bytes it has to give (the "natural" length of every output)
 *   the rest the request frame body, [code, id, arg...]
 *
 * Built with -DP11P_FUZZ_STANDALONE (no libFuzzer: gcc, the suite) it is a program
 * that runs the files it is given and then seeded mutations of them:
 *   helper_request_fuzzer ROUNDS SEED FILE... */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fast_codec.h"
#include "p11p-prescan.h"

#define SELECTORS 4
#define MAX_OUTPUT 4096 /* small: capacities are lowered and random lengths refused often */

static const CK_RV rvs[] = {
	CKR_OK, CKR_BUFFER_TOO_SMALL, CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID,
	CKR_OPERATION_NOT_INITIALIZED, CKR_ARGUMENTS_BAD, CKR_OK, CKR_OK,
};

static unsigned long served, closed, called; /* counts, for the standalone program */

static struct {
	CK_RV rv;
	unsigned lengths;     /* 0 exact, 1 its own, 2 past the capacity, 3 unavailable */
	CK_ULONG natural;     /* the length of what it has to give */
	unsigned calls;       /* module calls */
	int entered, left;
	unsigned binding;
} m;

/* ---- the fake module ---- */

static void read_all(const void *p, CK_ULONG n)
{
	const volatile uint8_t *b = p;
	uint8_t sum = 0;

	if (p == NULL)
		return; /* NULL with a length: a module would fail it (or crash: the checks' job) */
	for (CK_ULONG i = 0; i < n; i++)
		sum ^= b[i];
	(void)sum;
}

static CK_ULONG reported(CK_ULONG cap)
{
	switch (m.lengths & 3) {
	case 0:
		return m.natural <= cap ? m.natural : cap;
	case 1:
		return m.natural;
	case 2:
		return cap * 2 + 1;
	default:
		return CK_UNAVAILABLE_INFORMATION;
	}
}

static int is_nested(CK_ATTRIBUTE_TYPE t)
{
	return t == CKA_WRAP_TEMPLATE || t == CKA_UNWRAP_TEMPLATE || t == CKA_DERIVE_TEMPLATE;
}

static void read_template(const CK_ATTRIBUTE *t, CK_ULONG n)
{
	if (t == NULL)
		return;
	for (CK_ULONG i = 0; i < n; i++) {
		if (is_nested(t[i].type) && t[i].pValue != NULL)
			read_template(t[i].pValue, t[i].ulValueLen / sizeof(CK_ATTRIBUTE));
		else
			read_all(t[i].pValue, t[i].ulValueLen);
	}
}

static void read_mechanism(const CK_MECHANISM *mech)
{
	if (mech == NULL)
		return;
	read_all(mech->pParameter, mech->ulParameterLen);
	if (mech->pParameter == NULL)
		return;
	/* structured parameters: the buffers they point to, as a module reads them */
	if (mech->mechanism == CKM_AES_GCM && mech->ulParameterLen == sizeof(CK_GCM_PARAMS)) {
		const CK_GCM_PARAMS *p = mech->pParameter;

		read_all(p->iv_ptr, p->iv_len);
		read_all(p->aad_ptr, p->aad_len);
	} else if (mech->mechanism == CKM_RSA_PKCS_OAEP &&
		   mech->ulParameterLen == sizeof(CK_RSA_PKCS_OAEP_PARAMS)) {
		const CK_RSA_PKCS_OAEP_PARAMS *p = mech->pParameter;

		read_all(p->source_data, p->source_data_len);
	} else if (mech->mechanism == CKM_ECDH1_DERIVE &&
		   mech->ulParameterLen == sizeof(CK_ECDH1_DERIVE_PARAMS)) {
		const CK_ECDH1_DERIVE_PARAMS *p = mech->pParameter;

		read_all(p->shared_data, p->shared_data_len);
		read_all(p->public_data, p->public_data_len);
	}
}

static CK_RV out_bytes(CK_BYTE_PTR p, CK_ULONG_PTR plen)
{
	if (p == NULL) {
		*plen = m.natural;
	} else {
		CK_ULONG cap = *plen;

		memset(p, 0x5A, m.natural <= cap ? m.natural : cap);
		*plen = reported(cap);
	}
	return m.rv;
}

static CK_RV f_init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key)
{
	(void)s;
	(void)key;
	m.calls++;
	read_mechanism(mech);
	return m.rv;
}

static CK_RV f_digest_init(CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech)
{
	return f_init(s, mech, 0);
}

static CK_RV f_in_out(CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG n, CK_BYTE_PTR out,
		      CK_ULONG_PTR plen)
{
	(void)s;
	m.calls++;
	read_all(in, n);
	return out_bytes(out, plen);
}

static CK_RV f_out(CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR plen)
{
	(void)s;
	m.calls++;
	return out_bytes(out, plen);
}

static CK_RV f_in(CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG n)
{
	(void)s;
	m.calls++;
	read_all(in, n);
	return m.rv;
}

static CK_RV f_in_in(CK_SESSION_HANDLE s, CK_BYTE_PTR a, CK_ULONG na, CK_BYTE_PTR b, CK_ULONG nb)
{
	(void)s;
	m.calls++;
	read_all(a, na);
	read_all(b, nb);
	return m.rv;
}

static CK_RV f_session(CK_SESSION_HANDLE s)
{
	(void)s;
	m.calls++;
	return m.rv;
}

static CK_RV f_find_init(CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	(void)s;
	m.calls++;
	read_template(t, n);
	return m.rv;
}

static CK_RV f_find(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE_PTR p, CK_ULONG max, CK_ULONG_PTR count)
{
	(void)s;
	m.calls++;
	if (p != NULL) {
		for (CK_ULONG i = 0; i < max && i < m.natural; i++)
			p[i] = i + 1;
		*count = reported(max);
	} else {
		*count = 0;
	}
	return m.rv;
}

static CK_RV f_random(CK_SESSION_HANDLE s, CK_BYTE_PTR p, CK_ULONG n)
{
	(void)s;
	m.calls++;
	if (p != NULL)
		memset(p, 0x33, n);
	return m.rv;
}

static CK_RV f_session_info(CK_SESSION_HANDLE s, CK_SESSION_INFO_PTR p)
{
	(void)s;
	m.calls++;
	if (p != NULL) {
		p->slotID = 1;
		p->state = CKS_RW_USER_FUNCTIONS;
		p->flags = CKF_SERIAL_SESSION;
		p->ulDeviceError = m.natural;
	}
	return m.rv;
}

/* Writes the values of a template as a module does: lengths of queries, values up to
 * each buffer's room, the inner types and values of template attributes. */
static void write_template(CK_ATTRIBUTE_PTR t, CK_ULONG n, int depth)
{
	for (CK_ULONG i = 0; i < n; i++) {
		CK_ATTRIBUTE *a = &t[i];

		if (a->pValue == NULL) {
			a->ulValueLen = m.natural;
		} else if (is_nested(a->type) && depth < 8) {
			CK_ULONG count = a->ulValueLen / sizeof(CK_ATTRIBUTE);
			CK_ATTRIBUTE *inner = a->pValue;

			for (CK_ULONG j = 0; j < count; j++)
				inner[j].type = (CK_ATTRIBUTE_TYPE)(m.natural + j);
			write_template(inner, count, depth + 1);
			a->ulValueLen = (m.lengths & 3) == 3 ? CK_UNAVAILABLE_INFORMATION
				: ((m.lengths & 1) ? count + 1 : count) * sizeof(CK_ATTRIBUTE);
		} else {
			CK_ULONG cap = a->ulValueLen;

			memset(a->pValue, 0x77, m.natural <= cap ? m.natural : cap);
			a->ulValueLen = reported(cap);
		}
	}
}

static CK_RV f_get_attributes(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t,
			      CK_ULONG n)
{
	(void)s;
	(void)o;
	m.calls++;
	if (t != NULL)
		write_template(t, n, 0);
	return m.rv;
}

static CK_FUNCTION_LIST module = {
	.C_GetSessionInfo = f_session_info,
	.C_GetAttributeValue = f_get_attributes,
	.C_FindObjectsInit = f_find_init,
	.C_FindObjects = f_find,
	.C_FindObjectsFinal = f_session,
	.C_EncryptInit = f_init,
	.C_Encrypt = f_in_out,
	.C_EncryptUpdate = f_in_out,
	.C_EncryptFinal = f_out,
	.C_DecryptInit = f_init,
	.C_Decrypt = f_in_out,
	.C_DecryptUpdate = f_in_out,
	.C_DecryptFinal = f_out,
	.C_DigestInit = f_digest_init,
	.C_Digest = f_in_out,
	.C_DigestUpdate = f_in,
	.C_DigestFinal = f_out,
	.C_SignInit = f_init,
	.C_Sign = f_in_out,
	.C_SignUpdate = f_in,
	.C_SignFinal = f_out,
	.C_SignRecoverInit = f_init,
	.C_SignRecover = f_in_out,
	.C_VerifyInit = f_init,
	.C_Verify = f_in_in,
	.C_VerifyUpdate = f_in,
	.C_VerifyFinal = f_in,
	.C_VerifyRecoverInit = f_init,
	.C_VerifyRecover = f_in_out,
	.C_SeedRandom = f_in,
	.C_GenerateRandom = f_random,
};

/* ---- the table of bound sessions ---- */

static CK_RV enter(uint64_t id, CK_SESSION_HANDLE *real, unsigned *slot)
{
	if (id == 0 || (m.binding & 3) == 1)
		return CKR_SESSION_HANDLE_INVALID;
	if ((m.binding & 3) == 2)
		return CKR_CRYPTOKI_NOT_INITIALIZED;
	*real = (CK_SESSION_HANDLE)id;
	*slot = 7;
	m.entered++;
	return CKR_OK;
}

static void leave(uint64_t id, unsigned slot)
{
	(void)id;
	if (slot != 7)
		__builtin_trap();
	m.left++;
}

static const struct p11p_fast_io io = {
	.module = &module, .max_output = MAX_OUTPUT, .enter = enter, .leave = leave,
};

/* ---- the invariants ---- */

static void check_bins(const msgpack_object *o, int depth)
{
	if (depth > 8)
		__builtin_trap();
	if (o->type == MSGPACK_OBJECT_BIN && o->via.bin.size > MAX_OUTPUT)
		__builtin_trap(); /* more than any output may be */
	if (o->type == MSGPACK_OBJECT_ARRAY)
		for (uint32_t i = 0; i < o->via.array.size; i++)
			check_bins(&o->via.array.ptr[i], depth + 1);
	if (o->type == MSGPACK_OBJECT_MAP || o->type == MSGPACK_OBJECT_STR ||
	    o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_BOOLEAN)
		__builtin_trap(); /* the reply kinds have none of those */
}

static void check_reply(const msgpack_sbuffer *out)
{
	msgpack_unpacked u;
	size_t off = 0;
	const msgpack_object *r;

	if (out->size < 4 || p11p_prescan((const uint8_t *)out->data + 4, out->size - 4) != 0)
		__builtin_trap();
	msgpack_unpacked_init(&u);
	if (msgpack_unpack_next(&u, out->data + 4, out->size - 4, &off) != MSGPACK_UNPACK_SUCCESS)
		__builtin_trap();
	r = &u.data;
	/* [rv] or [rv, out]: every data-plane function has one output at most */
	if (r->type != MSGPACK_OBJECT_ARRAY || r->via.array.size < 1 || r->via.array.size > 2 ||
	    r->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
		__builtin_trap();
	if (m.calls > 0 && r->via.array.ptr[0].via.u64 != m.rv)
		__builtin_trap(); /* the module's answer, as it is */
	check_bins(r, 0);
	msgpack_unpacked_destroy(&u);
}

/* One request body served against the fake module as the selectors set it: 0, or -1
 * (the connection closes). */
static int serve_one(const uint8_t *sel, const uint8_t *body, size_t len)
{
	msgpack_sbuffer out;
	int ret;

	memset(&m, 0, sizeof m);
	m.rv = rvs[sel[0] % (sizeof rvs / sizeof rvs[0])];
	m.lengths = sel[1];
	m.binding = sel[2];
	m.natural = sel[3] < 0xF0 ? sel[3] : (CK_ULONG)1 << (sel[3] - 0xE0);
	msgpack_sbuffer_init(&out);
	ret = p11p_fast_serve(&io, (const char *)body, len, &out);
	if (m.entered != m.left || m.calls > 1 || (unsigned)m.entered != m.calls)
		__builtin_trap(); /* every call let in goes out; one module call at most */
	if (ret != 0 && m.calls > 0)
		__builtin_trap(); /* a request that closes the connection never reached the module */
	if (ret == 0)
		check_reply(&out);
	served += ret == 0;
	closed += ret != 0;
	called += m.calls;
	msgpack_sbuffer_destroy(&out);
	return ret;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *body;
	uint8_t *copy, hint;
	uint32_t len;
	size_t pos = 0, have;

	if (size < SELECTORS)
		return 0;
	if (!(data[2] & 0x80)) {
		(void)serve_one(data, data + SELECTORS, size - SELECTORS);
		return 0;
	}
	/* a mailbox's copy, in memory of its own size: ASan sees a frame that overruns it */
	have = size - SELECTORS;
	copy = malloc(have ? have : 1);
	if (copy == NULL)
		return 0;
	memcpy(copy, data + SELECTORS, have);
	while ((body = p11p_fast_frame(copy, &pos, have, &len, &hint)) != NULL) {
		if (body < copy || body + len > copy + have || pos > have)
			__builtin_trap(); /* a frame outside the copy */
		if (serve_one(data, body, len) != 0)
			break;
	}
	free(copy);
	return 0;
}

#ifdef P11P_FUZZ_STANDALONE
/* ---- without libFuzzer: the seeds, then seeded mutations of them ---- */

static uint64_t state;

static uint64_t next(void)
{
	state ^= state << 13;
	state ^= state >> 7;
	state ^= state << 17;
	return state;
}

static uint8_t *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	uint8_t *buf = NULL;
	long n;

	if (f == NULL)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
	    (buf = malloc((size_t)n + 1)) != NULL && fread(buf, 1, (size_t)n, f) == (size_t)n) {
		*len = (size_t)n;
	} else {
		free(buf);
		buf = NULL;
	}
	fclose(f);
	return buf;
}

/* Bytes that mean something to msgpack: nil, booleans, headers of every size. */
static const uint8_t interesting[] = {
	0xc0, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd3, 0xd9, 0xdc,
	0xdd, 0xde, 0xdf, 0x90, 0x91, 0x92, 0x93, 0x9f, 0x80, 0xa1, 0xff, 0x7f, 0x00, 0xca,
};

int main(int argc, char **argv)
{
	uint8_t *seeds[4096];
	size_t lens[4096], nseeds = 0;
	unsigned long rounds;

	if (argc < 3) {
		fprintf(stderr, "usage: %s ROUNDS SEED FILE...\n", argv[0]);
		return 2;
	}
	rounds = strtoul(argv[1], NULL, 10);
	state = strtoull(argv[2], NULL, 10) | 1;
	for (int i = 3; i < argc && nseeds < 4096; i++) {
		size_t len = 0;
		uint8_t *buf = slurp(argv[i], &len);

		if (buf == NULL) {
			fprintf(stderr, "cannot read %s\n", argv[i]);
			return 2;
		}
		LLVMFuzzerTestOneInput(buf, len);
		seeds[nseeds] = buf;
		lens[nseeds++] = len;
	}
	if (nseeds == 0)
		return 2;
	for (unsigned long r = 0; r < rounds; r++) {
		size_t k = next() % nseeds, len = lens[k];
		uint8_t *buf = malloc(len + 16);
		unsigned edits = 1 + next() % 4;

		memcpy(buf, seeds[k], len);
		for (unsigned e = 0; e < edits; e++) {
			size_t at = len ? next() % len : 0;

			switch (next() % 6) {
			case 0: /* a selector or body byte anything */
				if (len)
					buf[at] = (uint8_t)next();
				break;
			case 1:
				if (len)
					buf[at] = interesting[next() % sizeof interesting];
				break;
			case 2: /* cut */
				len = at;
				break;
			case 3: /* insert */
				if (len < lens[k] + 16) {
					memmove(buf + at + 1, buf + at, len - at);
					buf[at] = interesting[next() % sizeof interesting];
					len++;
				}
				break;
			case 4: /* delete */
				if (len) {
					memmove(buf + at, buf + at + 1, len - at - 1);
					len--;
				}
				break;
			default: /* another module behaviour */
				if (len >= SELECTORS)
					buf[next() % SELECTORS] = (uint8_t)next();
			}
		}
		LLVMFuzzerTestOneInput(buf, len);
		free(buf);
	}
	for (size_t i = 0; i < nseeds; i++)
		free(seeds[i]);
	printf("helper_request_fuzzer: %zu seeds, %lu mutations: %lu answered (%lu by the module), "
	       "%lu closed; no finding\n", nseeds, rounds, served, called, closed);
	return 0;
}
#endif
