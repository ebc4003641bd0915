/* p11p client tests — templates (input, nested, C_GetAttributeValue with per-attribute
 * results and nested templates) and mechanisms (no parameter, plain bytes, each
 * structured parameter of protocol/mechanisms.spec, wrong sizes). */
#include <stdint.h>

#include "codec_test.h"
#include "direct.h"

#define WRAP_TEMPLATE "1073742353" /* CKA_WRAP_TEMPLATE */
#define ALLOWED_MECHS "1073743360" /* CKA_ALLOWED_MECHANISMS */
#define UNAVAILABLE "18446744073709551615"

static void test_input_templates(void)
{
	CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
	CK_KEY_TYPE kt = CKK_AES;
	CK_BBOOL yes = CK_TRUE;
	CK_MECHANISM_TYPE allowed[2] = { CKM_AES_GCM, CKM_AES_CBC };
	CK_ATTRIBUTE inner[] = {
		{ CKA_CLASS, &cls, sizeof cls },
		{ CKA_KEY_TYPE, &kt, sizeof kt },
	};
	CK_ATTRIBUTE t[] = {
		{ CKA_CLASS, &cls, sizeof cls },
		{ CKA_TOKEN, &yes, sizeof yes },
		{ CKA_LABEL, NULL, 0 },
		{ CKA_VALUE, NULL, 5 },
		{ CKA_WRAP_TEMPLATE, inner, sizeof inner },
		{ CKA_ALLOWED_MECHANISMS, allowed, sizeof allowed },
	};
	CK_OBJECT_HANDLE h = 0;

	reply("[0,5]");
	CHECK_RV(C_CreateObject(1, t, 6, &h), CKR_OK);
	CHECK_REQ("[21,1,[[0,h\"0400000000000000\"],[1,h\"01\"],[3,nil],[17,5],"
		  "[" WRAP_TEMPLATE ",[[0,h\"0400000000000000\"],[256,h\"1f00000000000000\"]]],"
		  "[" ALLOWED_MECHS ",h\"87100000000000008210000000000000\"]],0]");
	CHECK(h == 5);
	CHECK_RV(C_CreateObject(1, NULL, 0, &h), CKR_OK);
	CHECK_REQ("[21,1,nil,0]");
	reply("[7,nil]");
	CHECK_RV(C_CreateObject(1, NULL, 3, &h), CKR_ARGUMENTS_BAD);
	CHECK_REQ("[21,1,3,0]");
	/* an empty nested template, and a NULL one */
	t[4].ulValueLen = 0;
	reply("[0]");
	CHECK_RV(C_SetAttributeValue(1, 2, &t[4], 1), CKR_OK);
	CHECK_REQ("[26,1,2,[[" WRAP_TEMPLATE ",[]]]]");
	t[4].pValue = NULL;
	CHECK_RV(C_SetAttributeValue(1, 2, &t[4], 1), CKR_OK);
	CHECK_REQ("[26,1,2,[[" WRAP_TEMPLATE ",nil]]]");
	/* a nested length that is not a whole number of attributes: refused here */
	t[4].pValue = inner;
	t[4].ulValueLen = sizeof inner - 1;
	fake_roundtrips = 0;
	CHECK_RV(C_SetAttributeValue(1, 2, &t[4], 1), CKR_ATTRIBUTE_VALUE_INVALID);
	CHECK(fake_roundtrips == 0);
	/* both templates of C_GenerateKeyPair, the one of C_UnwrapKey and C_DeriveKey */
	CK_OBJECT_HANDLE pub, priv;
	reply("[0,1,2]");
	CHECK_RV(C_GenerateKeyPair(1, NULL, &t[0], 1, &t[1], 1, &pub, &priv), CKR_OK);
	CHECK_REQ("[60,1,nil,[[0,h\"0400000000000000\"]],[[1,h\"01\"]],0,0]");
	reply("[0,3]");
	CHECK_RV(C_UnwrapKey(1, NULL, 4, (CK_BYTE_PTR) "w", 1, &t[1], 1, &h), CKR_OK);
	CHECK_REQ("[62,1,nil,4,h\"77\",[[1,h\"01\"]],0]");
	CHECK_RV(C_DeriveKey(1, NULL, 4, &t[1], 1, NULL), CKR_OK);
	CHECK_REQ("[63,1,nil,4,[[1,h\"01\"]],nil]");
}

static void test_get_attribute_value(void)
{
	CK_BYTE v0[8], v1[4], v3[8];
	CK_ATTRIBUTE inner[2];
	CK_BYTE i0[8], i1[8];
	CK_ATTRIBUTE t[5];

	memset(t, 0, sizeof t);
	t[0] = (CK_ATTRIBUTE){ CKA_CLASS, v0, sizeof v0 };
	t[1] = (CK_ATTRIBUTE){ CKA_VALUE, v1, sizeof v1 };
	t[2] = (CK_ATTRIBUTE){ CKA_LABEL, NULL, 77 };
	t[3] = (CK_ATTRIBUTE){ 0x7fffff01UL, v3, sizeof v3 };
	t[4] = (CK_ATTRIBUTE){ CKA_WRAP_TEMPLATE, inner, sizeof inner };
	inner[0] = (CK_ATTRIBUTE){ CKA_CLASS, i0, sizeof i0 };
	inner[1] = (CK_ATTRIBUTE){ CKA_KEY_TYPE, NULL, 0 };

	/* mixed results: written, sensitive, a length query, invalid type, nested template */
	reply("[17,[h\"0400000000000000\"," UNAVAILABLE ",5," UNAVAILABLE ",[[0,h\"0400000000000000\"],[256,8]]]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, t, 5), CKR_ATTRIBUTE_SENSITIVE);
	CHECK_REQ("[25,1,2,[[0,8],[17,4],[3,nil],[2147483393,8],[" WRAP_TEMPLATE ",[[0,8],[256,nil]]]]]");
	CHECK(t[0].ulValueLen == 8 && v0[0] == 4);
	CHECK(t[1].ulValueLen == CK_UNAVAILABLE_INFORMATION);
	CHECK(t[2].ulValueLen == 5);
	CHECK(t[3].ulValueLen == CK_UNAVAILABLE_INFORMATION);
	CHECK(t[4].ulValueLen == 2 * sizeof(CK_ATTRIBUTE));
	CHECK(inner[0].ulValueLen == 8 && i0[0] == 4 && inner[1].ulValueLen == 8);

	/* per-attribute results come back with CKR_ATTRIBUTE_TYPE_INVALID and BUFFER_TOO_SMALL */
	t[1].ulValueLen = sizeof v1;
	reply("[18,[h\"0500000000000000\",h\"01\",5," UNAVAILABLE ",[[0,h\"0400000000000000\"],[256,8]]]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, t, 5), CKR_ATTRIBUTE_TYPE_INVALID);
	CHECK(v0[0] == 5 && t[1].ulValueLen == 1 && v1[0] == 1);
	t[0].ulValueLen = 8;
	reply("[336,[" UNAVAILABLE ",h\"02\",5,3,[[0,h\"0400000000000000\"],[256,8]]]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, t, 5), CKR_BUFFER_TOO_SMALL);
	CHECK(t[0].ulValueLen == CK_UNAVAILABLE_INFORMATION && t[3].ulValueLen == 3);

	/* a nested template's length query: the wire count becomes count*sizeof */
	CK_ATTRIBUTE q = { CKA_WRAP_TEMPLATE, NULL, 0 };
	reply("[0,[2]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_OK);
	CHECK_REQ("[25,1,2,[[" WRAP_TEMPLATE ",nil]]]");
	CHECK(q.ulValueLen == 2 * sizeof(CK_ATTRIBUTE));
	reply("[18,[" UNAVAILABLE "]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_ATTRIBUTE_TYPE_INVALID);
	CHECK(q.ulValueLen == CK_UNAVAILABLE_INFORMATION);
	/* inner values of a nested template, with the inner types the module wrote */
	inner[1] = (CK_ATTRIBUTE){ 0, i1, sizeof i1 };
	q = (CK_ATTRIBUTE){ CKA_WRAP_TEMPLATE, inner, sizeof inner };
	reply("[0,[[[0,h\"0400000000000000\"],[256,h\"1f00000000000000\"]]]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_OK);
	CHECK_REQ("[25,1,2,[[" WRAP_TEMPLATE ",[[0,8],[0,8]]]]]");
	CHECK(i1[0] == 0x1f && inner[1].type == CKA_KEY_TYPE && inner[1].ulValueLen == 8 &&
	      q.ulValueLen == sizeof inner);
	/* CKA_ALLOWED_MECHANISMS is bytes, not a template */
	CK_BYTE mech[16];
	CK_ATTRIBUTE am = { CKA_ALLOWED_MECHANISMS, mech, sizeof mech };
	reply("[0,[h\"8710000000000000\"]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &am, 1), CKR_OK);
	CHECK_REQ("[25,1,2,[[" ALLOWED_MECHS ",16]]]");
	CHECK(am.ulValueLen == 8 && mech[0] == 0x87);
	/* an error rv: the template is untouched */
	t[0].ulValueLen = 8;
	reply("[130,[h\"09\"]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, t, 5), CKR_OBJECT_HANDLE_INVALID);
	CHECK(t[0].ulValueLen == 8);
	reply("[7]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, NULL, 3), CKR_ARGUMENTS_BAD);
	CHECK_REQ("[25,1,2,3]");

	/* malformed per-attribute answers */
	CK_ATTRIBUTE one = { CKA_CLASS, v0, sizeof v0 };
	static const char *const bad[] = {
		"[0,[h\"000000000000000000\"]]", /* longer than the buffer */
		"[0,[]]",                        /* too few values */
		"[0,[8,8]]",                     /* too many */
		"[0,[nil]]",                     /* no value */
		"[0,[[h\"00\"]]]",              /* nested values for a plain attribute */
		"[0,[\"abc\"]]",                 /* str is not bin */
		"[0,[-1]]",
		"[0,h\"00\"]",                   /* not an array */
		"[0]",                           /* no values at all */
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		one.ulValueLen = sizeof v0;
		reply(bad[i]);
		CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &one, 1), CKR_DEVICE_ERROR);
	}
	CK_ATTRIBUTE query = { CKA_CLASS, NULL, 0 };
	reply("[0,[h\"00\"]]"); /* bytes where only a length can be */
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &query, 1), CKR_DEVICE_ERROR);
	q = (CK_ATTRIBUTE){ CKA_WRAP_TEMPLATE, inner, sizeof inner };
	reply("[0,[[[0,h\"00\"],[1,8],[2,8]]]]"); /* three inner values for two inner attributes */
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_DEVICE_ERROR);
	/* the object's template is shorter than the room given: ulValueLen says so */
	reply("[0,[[[0,h\"0400000000000000\"]]]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_OK);
	CHECK(q.ulValueLen == sizeof(CK_ATTRIBUTE) && inner[0].ulValueLen == 8);
	q.ulValueLen = sizeof inner;
	reply("[0,[h\"00\"]]"); /* bytes for a nested template */
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_DEVICE_ERROR);
	reply("[0,[[[0]]]]"); /* an inner pair without its value */
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_DEVICE_ERROR);
	reply("[0,[[[\"0\",8]]]]"); /* an inner type that is not an integer */
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_DEVICE_ERROR);
	reply("[0,[[h\"0400000000000000\"]]]"); /* an inner value without its type */
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_DEVICE_ERROR);
	/* a reply that calls an application's plain inner buffer a nested template: the
	 * buffer (whose bytes would be garbage pointers) is never read as attributes */
	CK_BYTE garbage[2 * sizeof(CK_ATTRIBUTE)];
	CK_ATTRIBUTE plain_inner[1] = { { CKA_LABEL, garbage, sizeof garbage } };
	memset(garbage, 0x41, sizeof garbage);
	q = (CK_ATTRIBUTE){ CKA_WRAP_TEMPLATE, plain_inner, sizeof plain_inner };
	reply("[0,[[[" WRAP_TEMPLATE ",[[0,h\"00\"]]]]]]");
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_DEVICE_ERROR);
	q = (CK_ATTRIBUTE){ CKA_WRAP_TEMPLATE, inner, sizeof inner };
	q.pValue = NULL;
	reply("[0,[[]]]"); /* inner values where the application asked for the count */
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_DEVICE_ERROR);
	reply("[0,[18446744073709551614]]"); /* a count whose byte length overflows */
	CHECK_RV(p11p_wire_C_GetAttributeValue(1, 2, &q, 1), CKR_DEVICE_ERROR);
}

void test_templates(void)
{
	test_input_templates();
	test_get_attribute_value();
}

static void test_plain_mechanisms(void)
{
	CK_BYTE iv[16];
	CK_MECHANISM m = { CKM_SHA256, NULL, 0 };

	memset(iv, 0x11, sizeof iv);
	reply("[0]");
	CHECK_RV(p11p_wire_C_DigestInit(1, &m), CKR_OK);
	CHECK_REQ("[38,1,[592,nil]]");
	CHECK_RV(p11p_wire_C_DigestInit(1, NULL), CKR_OK);
	CHECK_REQ("[38,1,nil]");
	/* a parameter of a mechanism without a structure: plain bytes (AES-CBC's IV) */
	m = (CK_MECHANISM){ CKM_AES_CBC, iv, sizeof iv };
	CHECK_RV(p11p_wire_C_EncryptInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[30,1,[4226,h\"11111111111111111111111111111111\"],9]");
	/* an unknown vendor mechanism passes through */
	m = (CK_MECHANISM){ 0x80001234UL, iv, 3 };
	CHECK_RV(p11p_wire_C_SignInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[43,1,[2147488308,h\"111111\"],9]");
	/* a structured mechanism with a NULL parameter */
	m = (CK_MECHANISM){ CKM_AES_GCM, NULL, 0 };
	CHECK_RV(p11p_wire_C_EncryptInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[30,1,[4231,nil],9]");
}

static void test_structured_mechanisms(void)
{
	CK_BYTE label[] = "lbl", iv[12], aad[] = "AAD", nonce[7], shared[] = "sh", pub[] = "pub";
	CK_RSA_PKCS_OAEP_PARAMS oaep = { CKM_SHA256, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED, label, 3 };
	CK_RSA_PKCS_PSS_PARAMS pss = { CKM_SHA256, CKG_MGF1_SHA256, 32 };
	CK_GCM_PARAMS gcm;
	P11P_CCM_PARAMS ccm;
	CK_AES_CTR_PARAMS ctr;
	CK_ECDH1_DERIVE_PARAMS ecdh;
	CK_KEY_DERIVATION_STRING_DATA kd = { (CK_BYTE_PTR) "xyz", 3 };
	P11P_EDDSA_PARAMS eddsa;
	CK_AES_CBC_ENCRYPT_DATA_PARAMS aescbc;
	CK_DES_CBC_ENCRYPT_DATA_PARAMS descbc;
	CK_OBJECT_HANDLE key = 77;
	CK_MECHANISM m;

	memset(iv, 0x22, sizeof iv);
	memset(nonce, 0x33, sizeof nonce);
	reply("[0]");
	m = (CK_MECHANISM){ CKM_RSA_PKCS_OAEP, &oaep, sizeof oaep };
	CHECK_RV(p11p_wire_C_EncryptInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[30,1,[9,[592,2,1,h\"6c626c\"]],9]");
	oaep.pSourceData = NULL;
	oaep.ulSourceDataLen = 0;
	CHECK_RV(p11p_wire_C_EncryptInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[30,1,[9,[592,2,1,nil]],9]");
	m = (CK_MECHANISM){ CKM_SHA256_RSA_PKCS_PSS, &pss, sizeof pss };
	CHECK_RV(p11p_wire_C_SignInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[43,1,[67,[592,2,32]],9]");
	gcm = (CK_GCM_PARAMS){ iv, sizeof iv, 96, aad, 3, 128 };
	m = (CK_MECHANISM){ CKM_AES_GCM, &gcm, sizeof gcm };
	CHECK_RV(p11p_wire_C_DecryptInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[34,1,[4231,[h\"222222222222222222222222\",96,h\"414144\",128]],9]");
	gcm.pAAD = NULL;
	gcm.ulAADLen = 0;
	CHECK_RV(p11p_wire_C_DecryptInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[34,1,[4231,[h\"222222222222222222222222\",96,nil,128]],9]");
	ccm = (P11P_CCM_PARAMS){ 100, nonce, sizeof nonce, aad, 3, 16 };
	m = (CK_MECHANISM){ CKM_AES_CCM, &ccm, sizeof ccm };
	CHECK_RV(p11p_wire_C_EncryptInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[30,1,[4232,[100,h\"33333333333333\",h\"414144\",16]],9]");
	ctr.ulCounterBits = 32;
	memset(ctr.cb, 0x44, sizeof ctr.cb);
	m = (CK_MECHANISM){ CKM_AES_CTR, &ctr, sizeof ctr };
	CHECK_RV(p11p_wire_C_EncryptInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[30,1,[4230,[32,h\"44444444444444444444444444444444\"]],9]");
	ecdh = (CK_ECDH1_DERIVE_PARAMS){ CKD_NULL, 0, NULL, 3, pub };
	m = (CK_MECHANISM){ CKM_ECDH1_DERIVE, &ecdh, sizeof ecdh };
	CHECK_RV(C_DeriveKey(1, &m, 9, NULL, 0, NULL), CKR_OK);
	CHECK_REQ("[63,1,[4176,[1,nil,h\"707562\"]],9,nil,nil]");
	ecdh = (CK_ECDH1_DERIVE_PARAMS){ CKD_SHA256_KDF, 2, shared, 3, pub };
	m.mechanism = CKM_ECDH1_COFACTOR_DERIVE;
	CHECK_RV(C_DeriveKey(1, &m, 9, NULL, 0, NULL), CKR_OK);
	CHECK_REQ("[63,1,[4177,[6,h\"7368\",h\"707562\"]],9,nil,nil]");
	m = (CK_MECHANISM){ CKM_CONCATENATE_BASE_AND_DATA, &kd, sizeof kd };
	CHECK_RV(C_DeriveKey(1, &m, 9, NULL, 0, NULL), CKR_OK);
	CHECK_REQ("[63,1,[866,[h\"78797a\"]],9,nil,nil]");
	eddsa = (P11P_EDDSA_PARAMS){ CK_TRUE, 3, (CK_BYTE_PTR) "ctx" };
	m = (CK_MECHANISM){ CKM_EDDSA, &eddsa, sizeof eddsa };
	CHECK_RV(p11p_wire_C_SignInit(1, &m, 9), CKR_OK);
	CHECK_REQ("[43,1,[4183,[1,h\"637478\"]],9]");
	memset(aescbc.iv, 0x55, sizeof aescbc.iv);
	aescbc.pData = (CK_BYTE_PTR) "d";
	aescbc.length = 1;
	m = (CK_MECHANISM){ CKM_AES_CBC_ENCRYPT_DATA, &aescbc, sizeof aescbc };
	CHECK_RV(C_DeriveKey(1, &m, 9, NULL, 0, NULL), CKR_OK);
	CHECK_REQ("[63,1,[4357,[h\"55555555555555555555555555555555\",h\"64\"]],9,nil,nil]");
	memset(descbc.iv, 0x66, sizeof descbc.iv);
	descbc.pData = NULL;
	descbc.length = 0;
	m = (CK_MECHANISM){ CKM_DES3_CBC_ENCRYPT_DATA, &descbc, sizeof descbc };
	CHECK_RV(C_DeriveKey(1, &m, 9, NULL, 0, NULL), CKR_OK);
	CHECK_REQ("[63,1,[4355,[h\"6666666666666666\",nil]],9,nil,nil]");
	m = (CK_MECHANISM){ CKM_CONCATENATE_BASE_AND_KEY, &key, sizeof key };
	CHECK_RV(C_DeriveKey(1, &m, 9, NULL, 0, NULL), CKR_OK);
	CHECK_REQ("[63,1,[864,[77]],9,nil,nil]");

	/* a structured parameter whose length is not its structure's size */
	fake_roundtrips = 0;
	m = (CK_MECHANISM){ CKM_AES_GCM, &gcm, sizeof gcm - 1 };
	CHECK_RV(p11p_wire_C_EncryptInit(1, &m, 9), CKR_MECHANISM_PARAM_INVALID);
	m = (CK_MECHANISM){ CKM_RSA_PKCS_PSS, &pss, sizeof pss + 8 };
	CHECK_RV(p11p_wire_C_SignInit(1, &m, 9), CKR_MECHANISM_PARAM_INVALID);
	m = (CK_MECHANISM){ CKM_AES_CTR, iv, sizeof iv }; /* an IV where a structure belongs */
	CHECK_RV(p11p_wire_C_EncryptInit(1, &m, 9), CKR_MECHANISM_PARAM_INVALID);
	m = (CK_MECHANISM){ CKM_CONCATENATE_BASE_AND_KEY, &key, 4 };
	CHECK_RV(C_DeriveKey(1, &m, 9, NULL, 0, NULL), CKR_MECHANISM_PARAM_INVALID);
	CHECK(fake_roundtrips == 0);
}

void test_mechanisms(void)
{
	test_plain_mechanisms();
	test_structured_mechanisms();
}
