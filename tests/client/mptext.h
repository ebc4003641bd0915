/* p11p client tests — msgpack written as text, so test tables stay readable:
 *   nil  123  -5  1.5  true false  "str"  h"00ff" (bin)  [a, b]  {k: v}
 *   x"c1" splices raw bytes in unchanged (for malformed input). */
#ifndef P11P_TEST_MPTEXT_H
#define P11P_TEST_MPTEXT_H

#include <stddef.h>

#include <msgpack.h>

/* Appends the encoding of text to out; 0, or -1 on a syntax error. */
int mp_from_text(const char *text, msgpack_sbuffer *out);
/* Writes o as text (same syntax) into buf. */
void mp_to_text(const msgpack_object *o, char *buf, size_t size);

#endif
