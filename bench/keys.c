/* p11bench — the benchmark's token keys: found by label, generated once if missing. */
#include <string.h>

#include "keys.h"

static CK_BBOOL yes = CK_TRUE;
static CK_BBOOL no = CK_FALSE;

#define ATTR(t, v, n) { (t), (void *)(v), (n) }
#define BOOL_ATTR(t, b) ATTR((t), &(b), sizeof(CK_BBOOL))
#define TEXT_ATTR(t, s) ATTR((t), (s), strlen(s))
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

CK_RV bench_find_one(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls,
		     const char *label, CK_OBJECT_HANDLE *found, const char **what)
{
	CK_ATTRIBUTE tmpl[] = {
		ATTR(CKA_CLASS, &cls, sizeof(cls)),
		TEXT_ATTR(CKA_LABEL, label),
	};
	CK_OBJECT_HANDLE hits[2];
	CK_ULONG n = 0;
	CK_RV rv = f->C_FindObjectsInit(s, tmpl, COUNT(tmpl));
	if (rv != CKR_OK) {
		*what = "C_FindObjectsInit";
		return rv;
	}
	rv = f->C_FindObjects(s, hits, 2, &n);
	CK_RV final_rv = f->C_FindObjectsFinal(s);
	if (rv != CKR_OK) {
		*what = "C_FindObjects";
		return rv;
	}
	if (final_rv != CKR_OK) {
		*what = "C_FindObjectsFinal";
		return final_rv;
	}
	if (n > 1) {
		*what = "more than one object with the label";
		return BENCH_BAD_OUTPUT;
	}
	*found = n == 1 ? hits[0] : CK_INVALID_HANDLE;
	return CKR_OK;
}

static CK_RV generate_aes(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *key)
{
	CK_MECHANISM mech = { CKM_AES_KEY_GEN, NULL, 0 };
	CK_ULONG len = 32;
	static unsigned char id[] = { 0xbe, 0x01 };
	CK_ATTRIBUTE tmpl[] = {
		BOOL_ATTR(CKA_TOKEN, yes), BOOL_ATTR(CKA_PRIVATE, yes),
		BOOL_ATTR(CKA_SENSITIVE, yes), BOOL_ATTR(CKA_EXTRACTABLE, no),
		BOOL_ATTR(CKA_ENCRYPT, yes), BOOL_ATTR(CKA_DECRYPT, yes),
		ATTR(CKA_VALUE_LEN, &len, sizeof(len)), TEXT_ATTR(CKA_LABEL, BENCH_LABEL_AES),
		ATTR(CKA_ID, id, sizeof(id)),
	};
	return f->C_GenerateKey(s, &mech, tmpl, COUNT(tmpl), key);
}

/* bench-ec is the same key on every token, made from these bytes rather than generated:
 * a signature made through one member of a group verifies on any other
 * (ecdsa-p256-verify in a balance group). A benchmark key, public here, nothing else. */
static unsigned char ec_scalar[32] = {
	0x4e, 0x84, 0xd5, 0x54, 0xe0, 0x7b, 0xd0, 0xeb,
	0xe6, 0xb8, 0xae, 0x1e, 0x97, 0x77, 0x6e, 0x90,
	0xab, 0xc4, 0xad, 0xcb, 0xd3, 0x95, 0x73, 0x79,
	0x94, 0xdf, 0x05, 0xe6, 0x9f, 0xcd, 0xee, 0x9b,
};
/* its public point, uncompressed, DER-wrapped as an OCTET STRING (CKA_EC_POINT) */
static unsigned char ec_point[67] = {
	0x04, 0x41, 0x04, 0x02, 0xeb, 0xb3, 0x2c, 0x6e,
	0xa4, 0xa8, 0x8f, 0xdc, 0x9a, 0x3c, 0xa6, 0x92,
	0x6e, 0x6b, 0x51, 0x0c, 0x9b, 0x34, 0xa5, 0x08,
	0xd4, 0x6c, 0xa4, 0x62, 0xce, 0x76, 0x89, 0xc0,
	0x0d, 0xc2, 0x41, 0xca, 0xc5, 0x23, 0x34, 0x38,
	0x11, 0x50, 0x79, 0x1d, 0xff, 0x92, 0xe7, 0x0d,
	0x35, 0xb8, 0x53, 0xde, 0x3c, 0x22, 0x6d, 0x9d,
	0x2d, 0xfb, 0xdb, 0x2a, 0xea, 0x8a, 0xd9, 0x98,
	0xf2, 0x3d, 0x1a,
};

static CK_RV generate_ec(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *key)
{
	static unsigned char p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
	static unsigned char id[] = { 0xbe, 0x02 };
	CK_OBJECT_CLASS pub_class = CKO_PUBLIC_KEY, priv_class = CKO_PRIVATE_KEY;
	CK_KEY_TYPE type = CKK_EC;
	CK_ATTRIBUTE pub[] = {
		ATTR(CKA_CLASS, &pub_class, sizeof(pub_class)), ATTR(CKA_KEY_TYPE, &type, sizeof(type)),
		BOOL_ATTR(CKA_TOKEN, yes), BOOL_ATTR(CKA_VERIFY, yes),
		ATTR(CKA_EC_PARAMS, p256, sizeof(p256)), ATTR(CKA_EC_POINT, ec_point, sizeof(ec_point)),
		TEXT_ATTR(CKA_LABEL, BENCH_LABEL_EC), ATTR(CKA_ID, id, sizeof(id)),
	};
	CK_ATTRIBUTE priv[] = {
		ATTR(CKA_CLASS, &priv_class, sizeof(priv_class)), ATTR(CKA_KEY_TYPE, &type, sizeof(type)),
		BOOL_ATTR(CKA_TOKEN, yes), BOOL_ATTR(CKA_PRIVATE, yes),
		BOOL_ATTR(CKA_SENSITIVE, yes), BOOL_ATTR(CKA_SIGN, yes),
		ATTR(CKA_EC_PARAMS, p256, sizeof(p256)), ATTR(CKA_VALUE, ec_scalar, sizeof(ec_scalar)),
		TEXT_ATTR(CKA_LABEL, BENCH_LABEL_EC), ATTR(CKA_ID, id, sizeof(id)),
	};
	CK_OBJECT_HANDLE pub_key;
	CK_RV rv = f->C_CreateObject(s, pub, COUNT(pub), &pub_key);
	return rv == CKR_OK ? f->C_CreateObject(s, priv, COUNT(priv), key) : rv;
}

static CK_RV generate_rsa(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *key)
{
	CK_MECHANISM mech = { CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0 };
	CK_ULONG bits = 2048;
	static unsigned char exponent[] = { 0x01, 0x00, 0x01 };
	static unsigned char id[] = { 0xbe, 0x03 };
	CK_ATTRIBUTE pub[] = {
		BOOL_ATTR(CKA_TOKEN, yes), BOOL_ATTR(CKA_VERIFY, yes),
		ATTR(CKA_MODULUS_BITS, &bits, sizeof(bits)),
		ATTR(CKA_PUBLIC_EXPONENT, exponent, sizeof(exponent)),
		TEXT_ATTR(CKA_LABEL, BENCH_LABEL_RSA), ATTR(CKA_ID, id, sizeof(id)),
	};
	CK_ATTRIBUTE priv[] = {
		BOOL_ATTR(CKA_TOKEN, yes), BOOL_ATTR(CKA_PRIVATE, yes),
		BOOL_ATTR(CKA_SENSITIVE, yes), BOOL_ATTR(CKA_SIGN, yes),
		TEXT_ATTR(CKA_LABEL, BENCH_LABEL_RSA), ATTR(CKA_ID, id, sizeof(id)),
	};
	CK_OBJECT_HANDLE pub_key;
	return f->C_GenerateKeyPair(s, &mech, pub, COUNT(pub), priv, COUNT(priv), &pub_key, key);
}

typedef CK_RV (*generator)(CK_FUNCTION_LIST_PTR, CK_SESSION_HANDLE, CK_OBJECT_HANDLE *);

CK_RV bench_keys_get(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, unsigned need, int generate,
		     bench_keys *keys, const char **what)
{
	const struct {
		unsigned bit;
		CK_OBJECT_CLASS cls;
		const char *label;
		CK_OBJECT_HANDLE *slot;
		generator make;
		const char *make_name;
	} table[] = {
		{ BENCH_KEY_AES, CKO_SECRET_KEY, BENCH_LABEL_AES, &keys->aes, generate_aes,
		  "C_GenerateKey(" BENCH_LABEL_AES ")" },
		{ BENCH_KEY_EC, CKO_PRIVATE_KEY, BENCH_LABEL_EC, &keys->ec, generate_ec,
		  "C_CreateObject(" BENCH_LABEL_EC ")" },
		{ BENCH_KEY_RSA, CKO_PRIVATE_KEY, BENCH_LABEL_RSA, &keys->rsa, generate_rsa,
		  "C_GenerateKeyPair(" BENCH_LABEL_RSA ")" },
		/* after its private half, with which it is made */
		{ BENCH_KEY_EC_PUB, CKO_PUBLIC_KEY, BENCH_LABEL_EC, &keys->ec_pub, NULL,
		  "public key " BENCH_LABEL_EC },
	};
	memset(keys, 0, sizeof(*keys));
	for (size_t i = 0; i < COUNT(table); i++) {
		if (!(need & table[i].bit))
			continue;
		CK_RV rv = bench_find_one(f, s, table[i].cls, table[i].label, table[i].slot, what);
		if (rv != CKR_OK)
			return rv;
		if (*table[i].slot != CK_INVALID_HANDLE)
			continue;
		if (!generate || table[i].make == NULL) {
			*what = table[i].make ? table[i].label : table[i].make_name;
			return CKR_KEY_HANDLE_INVALID;
		}
		rv = table[i].make(f, s, table[i].slot);
		if (rv != CKR_OK) {
			*what = table[i].make_name;
			return rv;
		}
		keys->created |= table[i].bit;
	}
	return CKR_OK;
}
