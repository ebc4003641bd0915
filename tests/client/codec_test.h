/* p11p client tests — the codec test's harness: checks that count and report, a
 * scripted reply, the request seen by the fake link. */
#ifndef P11P_TEST_CODEC_TEST_H
#define P11P_TEST_CODEC_TEST_H

#include <stdio.h>
#include <string.h>

#include "codec.h"
#include "fake_link.h"
#include "mptext.h"

extern int checks, failures;

void check(int ok, const char *what, const char *file, int line);
void check_rv(CK_RV got, CK_RV want, const char *what, const char *file, int line);
void check_req(const char *want, const char *file, int line);
/* The next round trip answers this (text, see mptext.h). */
void reply(const char *text);

#define CHECK(cond) check((cond) ? 1 : 0, #cond, __FILE__, __LINE__)
#define CHECK_RV(expr, want) check_rv((expr), (want), #expr, __FILE__, __LINE__)
#define CHECK_REQ(text) check_req((text), __FILE__, __LINE__)
#define CHECK_MEM(p, bytes, n) CHECK(memcmp((p), (bytes), (n)) == 0)

void test_kinds(void);
void test_templates(void);
void test_mechanisms(void);
void test_malformed(void);
void test_fuzz(void);

#endif
