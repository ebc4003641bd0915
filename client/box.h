/* p11p client — a data-plane connection's mailbox (protocol/p11p-box.h): asked for once
 * per connection, then a call's request and replies travel through it when they fit and
 * the socket otherwise. */
#ifndef P11P_BOX_CLIENT_H
#define P11P_BOX_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "p11p-box.h"

/* Asks the helper for a mailbox on the new connection `fd` (its token sent): NULL when
 * the helper did not give a usable one (the connection then stays on the socket), with
 * *broken set when the connection failed on the way. */
struct p11p_box *p11p_box_ask(int fd, int64_t deadline, int *broken);
/* Tells the helper's thread the connection ends (before its socket closes), and unmaps. */
void p11p_box_drop(struct p11p_box *box);

/* One round trip through the mailbox: the request frame `a` (`alen` bytes, its header
 * space included) and, for a pair, `b`; the header of each carries `cpu` (as
 * p11p_send_hinted). Watches for the reply awake up to `spin_ns` while `keep_spinning`
 * says so, then sleeps on the word. The replies (1, or 2 for a pair: malloc'd bodies)
 * come from the mailbox, or the socket when the helper put them there.
 * 0: done; 1: the requests do not fit (the thread is sent back to the socket: the caller
 * uses it); -1: the connection broke or the deadline passed. */
int p11p_box_round(int fd, struct p11p_box *box, char *a, size_t alen, char *b, size_t blen,
		   int cpu, int64_t deadline, int64_t spin_ns, int (*keep_spinning)(void),
		   char **ra, size_t *ralen, char **rb, size_t *rblen);

/* The replies in the reply area, `n` bytes as the helper said: one frame (rb NULL) or
 * two, each a 4-byte big-endian length and a body, nothing past them; copied out before
 * they are read. 0 with malloc'd bodies, or -1 with *ra (and *rb) NULL. (fuzzed by
 * fuzz/client_reply_fuzzer.c) */
int p11p_box_take(const struct p11p_box *box, uint32_t n, char **ra, size_t *ralen,
		  char **rb, size_t *rblen);

#endif
