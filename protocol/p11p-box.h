/* p11p — a data-plane connection's mailbox (protocol/README.md, "Data plane: the
 * mailbox"), shared by the client library and the helper: a sealed memfd the helper makes
 * for one connection and passes to its client, where a request and its reply travel
 * without the socket, and a futex word says whose turn it is. The bytes in each area
 * are the frames the socket would carry (a request's 4-byte header with its CPU hint
 * included); either side copies them out before it reads them. The socket stays: the
 * token, the mailbox's fd, a nudge, anything too large for an area, and either side's
 * end (a closed socket is the end of the connection, whatever the word says). */
#ifndef P11P_BOX_H
#define P11P_BOX_H

#include <linux/futex.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define P11P_BOX_SIZE (128u << 10)       /* the memfd's size, sealed */
#define P11P_BOX_HEAD 64u                /* the word and the lengths */
#define P11P_BOX_AREA ((P11P_BOX_SIZE - P11P_BOX_HEAD) / 2)  /* a request's or a reply's */
#define P11P_BOX_ON_SOCKET UINT32_MAX    /* a reply's length: the reply is on the socket */

/* The word: whose turn it is.
 *   SOCKET   the helper's thread reads the socket: a request goes there, or into the
 *            area with REQUEST stored by the client and a zero-length frame sent (the
 *            nudge); the helper stores SOCKET when the connection was idle a while, or
 *            the client when its request does not fit (and wakes the thread)
 *   READY    the helper's thread waits on the word for a request
 *   REQUEST  the client's request is in the request area (CAS from READY, then a wake)
 *   REPLY    the replies are in the reply area, or on the socket (P11P_BOX_ON_SOCKET);
 *            the client takes them and stores READY
 *   CLOSED   the helper ends the connection (its socket is shut too) */
enum { P11P_BOX_SOCKET, P11P_BOX_READY, P11P_BOX_REQUEST, P11P_BOX_REPLY, P11P_BOX_CLOSED };

struct p11p_box {
	_Atomic uint32_t word;
	_Atomic uint32_t req_len;         /* bytes in req, written before REQUEST */
	_Atomic uint32_t rep_len;         /* bytes in rep, or P11P_BOX_ON_SOCKET, before REPLY */
	uint8_t pad[P11P_BOX_HEAD - 12];
	uint8_t req[P11P_BOX_AREA];
	uint8_t rep[P11P_BOX_AREA];
};

_Static_assert(sizeof(struct p11p_box) == P11P_BOX_SIZE, "the mailbox's layout");

/* A futex call on the word (shared: the two sides are processes). */
static inline long p11p_box_futex(_Atomic uint32_t *w, int op, uint32_t val,
				  const struct timespec *t)
{
	return syscall(SYS_futex, w, op, val, t, NULL, 0);
}

/* Whether the other side's end of the socket is gone, or sent what it must not while
 * the word is in use (a side that waits on the word looks now and then). */
static inline int p11p_box_peer_gone(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN | POLLRDHUP };

	return poll(&p, 1, 0) != 0;
}

#endif
