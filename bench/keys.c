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

static CK_RV generate_ec(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *key)
{
	CK_MECHANISM mech = { CKM_EC_KEY_PAIR_GEN, NULL, 0 };
	static unsigned char p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
	static unsigned char id[] = { 0xbe, 0x02 };
	CK_ATTRIBUTE pub[] = {
		BOOL_ATTR(CKA_TOKEN, yes), BOOL_ATTR(CKA_VERIFY, yes),
		ATTR(CKA_EC_PARAMS, p256, sizeof(p256)), TEXT_ATTR(CKA_LABEL, BENCH_LABEL_EC),
		ATTR(CKA_ID, id, sizeof(id)),
	};
	CK_ATTRIBUTE priv[] = {
		BOOL_ATTR(CKA_TOKEN, yes), BOOL_ATTR(CKA_PRIVATE, yes),
		BOOL_ATTR(CKA_SENSITIVE, yes), BOOL_ATTR(CKA_SIGN, yes),
		TEXT_ATTR(CKA_LABEL, BENCH_LABEL_EC), ATTR(CKA_ID, id, sizeof(id)),
	};
	CK_OBJECT_HANDLE pub_key;
	return f->C_GenerateKeyPair(s, &mech, pub, COUNT(pub), priv, COUNT(priv), &pub_key, key);
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
		  "C_GenerateKeyPair(" BENCH_LABEL_EC ")" },
		{ BENCH_KEY_RSA, CKO_PRIVATE_KEY, BENCH_LABEL_RSA, &keys->rsa, generate_rsa,
		  "C_GenerateKeyPair(" BENCH_LABEL_RSA ")" },
		/* after its private half, with which it is generated */
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
