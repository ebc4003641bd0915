/* p11p client tests — replies that break the protocol: bad msgpack (truncated, trailing
 * bytes, reserved bytes, hostile lengths, deep nesting), wrong shapes and wrong types.
 * Each must give CKR_DEVICE_ERROR and leave nothing behind; a seeded fuzz loop mutates
 * valid replies and checks that nothing crashes (run under ASan/UBSan by the tests). */
#include <stdint.h>
#include <stdlib.h>

#include "codec_test.h"
#include "direct.h"
#include "find.h"

long fuzz_iterations;

static CK_RV sign(void)
{
	CK_BYTE out[16];
	CK_ULONG len = sizeof out;

	return p11p_wire_C_Sign(1, (CK_BYTE_PTR) "d", 1, out, &len);
}

static void test_bad_msgpack(void)
{
	static const char *const bad[] = {
		"",                     /* empty body */
		"x\"92\"",              /* array of 2, no elements */
		"x\"9200\"",            /* array of 2, one element */
		"x\"9200c4\"",          /* bin without its length */
		"x\"9200c405aabb\"",    /* bin shorter than its length */
		"[0,h\"aa\"] 1",        /* a second object after the first */
		"x\"9200c1\"",          /* 0xc1 is never used */
		"x\"ddffffffff00\"",    /* array32 of 2**32-1 elements in 6 bytes */
		"x\"9200c6ffffffff\"",  /* bin32 of 4 GiB */
		"x\"9200dbffffffff\"",  /* str32 of 4 GiB */
		"x\"dfffffffff\"",      /* map32 of 2**32-1 pairs */
		"x\"9200c9ffffffff01\"", /* ext32 of 4 GiB */
		"x\"9200d40100\"",      /* an ext type */
		"x\"cf\"",              /* uint64 without its bytes */
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		msgpack_sbuffer_clear(&fake_reply);
		if (mp_from_text(bad[i], &fake_reply) != 0)
			continue; /* the text itself is refused: nothing to send */
		CHECK_RV(sign(), CKR_DEVICE_ERROR);
	}

	/* every strict prefix of a valid reply is truncated */
	CK_BYTE out[16];
	CK_ULONG len;
	msgpack_sbuffer full;
	msgpack_sbuffer_init(&full);
	mp_from_text("[0,h\"00112233445566778899\"]", &full);
	for (size_t n = 0; n < full.size; n++) {
		msgpack_sbuffer_clear(&fake_reply);
		msgpack_sbuffer_write(&fake_reply, full.data, n);
		len = sizeof out;
		CHECK_RV(p11p_wire_C_Sign(1, NULL, 0, out, &len), CKR_DEVICE_ERROR);
	}
	msgpack_sbuffer_destroy(&full);

	/* nesting deeper than any reply has */
	msgpack_sbuffer_clear(&fake_reply);
	for (int i = 0; i < 100; i++)
		msgpack_sbuffer_write(&fake_reply, "\x91", 1);
	msgpack_sbuffer_write(&fake_reply, "\x00", 1);
	CHECK_RV(sign(), CKR_DEVICE_ERROR);
}

static void test_bad_shapes(void)
{
	static const char *const bad[] = {
		"0", "nil", "{0:0}", "\"ok\"", "h\"00\"", /* not an array */
		"[]",                                     /* no rv */
		"[\"0\",h\"aa\"]", "[-1]", "[0.0]", "[true]", "[nil]", "[h\"00\"]", /* rv not an int */
		"[0,h\"aa\",1]",                          /* more outputs than the function has */
		"[0,h\"aa\",nil]",
		"[0,8]",                                  /* a length where the data belongs */
		"[0,\"aa\"]",                             /* str is not bin */
		"[0,[h\"aa\"]]",
		"[336,h\"aa\"]",                          /* too small, with data */
		"[336,nil]",                              /* too small, without the length */
		"[0,h\"00112233445566778899aabbccddeeff00\"]", /* 17 bytes in 16 */
		"[0,{0:0}]",
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		reply(bad[i]);
		fake_released_healthy = -1;
		CHECK_RV(sign(), CKR_DEVICE_ERROR);
		CHECK(fake_released_healthy == 0); /* the connection that said it is dropped */
	}
	/* an error answer [rv] is fine: it is the rv */
	reply("[5]");
	CHECK_RV(sign(), CKR_GENERAL_ERROR);
	CHECK(fake_released_healthy == 1);
	reply("[18446744073709551615]");
	CHECK_RV(sign(), (CK_RV)-1);
}

/* ---- fuzz: mutated valid replies, many functions ---- */

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint32_t next_random(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)(rng >> 16);
}

static CK_RV fuzz_sign(void)
{
	CK_BYTE out[16];
	CK_ULONG len = sizeof out;

	return p11p_wire_C_Sign(1, NULL, 0, out, &len);
}

static CK_RV fuzz_get_attributes(void)
{
	CK_BYTE a[8], b[4], i0[8], i1[3];
	CK_ATTRIBUTE inner[2] = { { CKA_CLASS, i0, sizeof i0 }, { CKA_LABEL, i1, sizeof i1 } };
	CK_ATTRIBUTE t[4] = {
		{ CKA_CLASS, a, sizeof a },
		{ CKA_LABEL, b, sizeof b },
		{ CKA_VALUE, NULL, 0 },
		{ CKA_WRAP_TEMPLATE, inner, sizeof inner },
	};

	return p11p_wire_C_GetAttributeValue(1, 2, t, 4);
}

static CK_RV fuzz_token_info(void)
{
	CK_TOKEN_INFO info;

	return C_GetTokenInfo(1, &info);
}

static CK_RV fuzz_find(void)
{
	CK_OBJECT_HANDLE h[3];
	CK_ULONG n;

	return p11p_wire_C_FindObjects(1, h, 3, &n);
}

static CK_RV fuzz_slots(void)
{
	CK_SLOT_ID s[2];
	CK_ULONG n = 2;

	return C_GetSlotList(CK_TRUE, s, &n);
}

static CK_RV fuzz_random(void)
{
	CK_BYTE r[5];

	return p11p_wire_C_GenerateRandom(1, r, sizeof r);
}

static CK_RV fuzz_keypair(void)
{
	CK_OBJECT_HANDLE a, b;

	return C_GenerateKeyPair(1, NULL, NULL, 0, NULL, 0, &a, &b);
}

static const struct {
	CK_RV (*call)(void);
	const char *reply;
} cases[] = {
	{ fuzz_sign, "[0,h\"00112233445566778899aabbccddeeff\"]" },
	{ fuzz_sign, "[336,32]" },
	{ fuzz_get_attributes,
	  "[17,[h\"0400000000000000\",h\"616263\",5,[[0,h\"0400000000000000\"],[3,18446744073709551615]]]]" },
	{ fuzz_get_attributes, "[336,[18446744073709551615,h\"61\",5,[[0,8],[3,3]]]]" },
	{ fuzz_token_info,
	  "[0,[h\"4141414141414141414141414141414141414141414141414141414141414141\","
	  "h\"4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d\","
	  "h\"6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d6d\",h\"73737373737373737373737373737373\","
	  "1037,1,2,3,4,5,6,7,8,9,10,[2,6],[1,0],h\"32303236313132323030303030303030\"]]" },
	{ fuzz_find, "[0,[1,2,3]]" },
	{ fuzz_slots, "[0,[1,2]]" },
	{ fuzz_random, "[0,h\"0102030405\"]" },
	{ fuzz_keypair, "[0,10,11]" },
};

static void mutate(msgpack_sbuffer *out, const char *base, size_t len)
{
	static const char markers[] = "\xc1\xc4\xc6\xcf\xd9\xdb\xdc\xdd\xde\xdf\x90\x9f\xc0\xff\x7f";
	char buf[2048];
	size_t n = len < sizeof buf - 8 ? len : sizeof buf - 8;
	int rounds = 1 + (int)(next_random() % 3);

	memcpy(buf, base, n);
	while (rounds-- > 0 && n > 0) {
		size_t at = next_random() % n;

		switch (next_random() % 5) {
		case 0: buf[at] ^= (char)(1u << (next_random() % 8)); break;
		case 1: n = at; break; /* truncate */
		case 2: buf[at] = markers[next_random() % (sizeof markers - 1)]; break;
		case 3: buf[at] = (char)next_random(); break;
		case 4: /* insert a byte */
			memmove(buf + at + 1, buf + at, n - at);
			buf[at] = (char)next_random();
			n++;
			break;
		}
	}
	msgpack_sbuffer_clear(out);
	msgpack_sbuffer_write(out, buf, n);
}

void test_fuzz(void)
{
	size_t ncases = sizeof cases / sizeof cases[0];
	msgpack_sbuffer base[sizeof cases / sizeof cases[0]];
	long device_errors = 0;

	for (size_t i = 0; i < ncases; i++) {
		msgpack_sbuffer_init(&base[i]);
		if (mp_from_text(cases[i].reply, &base[i]) != 0)
			CHECK(!"fuzz base reply parses");
		msgpack_sbuffer_clear(&fake_reply);
		msgpack_sbuffer_write(&fake_reply, base[i].data, base[i].size);
		CHECK(cases[i].call() != CKR_DEVICE_ERROR); /* the base reply is valid */
	}
	for (long it = 0; it < fuzz_iterations; it++) {
		size_t i = next_random() % ncases;

		mutate(&fake_reply, base[i].data, base[i].size);
		if (cases[i].call() == CKR_DEVICE_ERROR)
			device_errors++;
	}
	CHECK(fake_in_flight == 0);
	CHECK(device_errors > fuzz_iterations / 4); /* most mutations break the reply */
	for (size_t i = 0; i < ncases; i++)
		msgpack_sbuffer_destroy(&base[i]);
	printf("fuzz: %ld mutated replies, %ld refused as malformed\n", fuzz_iterations, device_errors);
}

void test_malformed(void)
{
	test_bad_msgpack();
	test_bad_shapes();
}
