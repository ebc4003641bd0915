/* p11p helper — the data plane's connections (p11p_fast.h): the listener's thread accepts a
 * connection of the uid the daemon allows, gives it a thread of its own, which reads the
 * token (hello), then requests, a pair sent at once among them, and answers each with
 * the codec (p11p_fast_serve) on that thread; it follows the client's CPU hint. A
 * client may ask for a mailbox (protocol/p11p-box.h): the requests and replies of a busy
 * connection then travel through shared memory and a futex word, not the socket. A frame
 * that does not parse, or a request of the wrong shape, closes its connection. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fast.h"
#include "p11p-box.h"

#define FAST_MAX_FRAME (4u << 20)         /* a request (the client's inputs: 1 MiB at most) */
#define FAST_HELLO_MS 2000

struct conn {
	int fd;
	cpu_set_t cpus;                  /* where its thread may run (0 bits: unknown) */
	unsigned place;                  /* its entry in p11p_fast.fds */
	msgpack_sbuffer out;
	msgpack_sbuffer held;            /* replies held while more requests are read */
	uint8_t *in;                     /* a request larger than `first` holds */
	size_t in_cap;
	size_t pos, have;                /* read: first (boxin while boxed) [pos..have) */
	struct p11p_box *box;            /* its mailbox, once the client asked for one */
	uint8_t *boxin;                  /* a copy of the mailbox's request (P11P_BOX_AREA) */
	int boxed;                       /* the thread watches the mailbox, not the socket */
	int spilled;                     /* the replies of this mailbox request go on the socket */
	uint8_t first[4096];             /* what one recv takes at most */
};

#define BOX_IDLE_NS 200000000L           /* a mailbox idle this long: back to the socket */

#define FAST_HOLD (64u << 10)            /* replies held at most before they go */

/* ---- connections ---- */

static int io_all(int fd, void *buf, size_t n, int writing)
{
	uint8_t *p = buf;

	while (n > 0) {
		ssize_t k = writing ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

/* The token, read within FAST_HELLO_MS: 0 and the connection's epoch set when it is the
 * listener's now (from a process of the uid it allows now). */
static int hello(int fd, uid_t uid)
{
	unsigned char token[FAST_TOKEN];
	struct pollfd pfd = { fd, POLLIN, 0 };
	size_t got = 0;
	unsigned char diff = 0;

	while (got < sizeof token) {
		if (poll(&pfd, 1, FAST_HELLO_MS) <= 0)
			return -1;
		ssize_t k = recv(fd, token + got, sizeof token - got, 0);
		if (k <= 0)
			return -1;
		got += (size_t)k;
	}
	pthread_mutex_lock(&p11p_fast.lock);
	for (size_t i = 0; i < sizeof token; i++)
		diff |= token[i] ^ p11p_fast.token[i];
	if (uid != p11p_fast.uid)
		diff = 1;
	p11p_fast_conn_epoch = p11p_fast.epoch;
	pthread_mutex_unlock(&p11p_fast.lock);
	return diff ? -1 : 0;
}

/* The client's CPU hint (the header's first byte: its CPU + 1, 0: none): the thread
 * moves to that CPU when it runs elsewhere and may run there, and may go anywhere it
 * could before. A call then wakes a thread on its own CPU both ways, not one on another
 * CPU (an inter-processor interrupt each way), and the scheduler keeps the pair there
 * (protocol/README.md, "Data plane"; measured in the issue note of #13). */
static void follow(struct conn *c, unsigned hint)
{
	cpu_set_t one;
	int cpu = (int)hint - 1;

	if (hint == 0 || !CPU_ISSET(cpu, &c->cpus) || sched_getcpu() == cpu)
		return;
	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	if (sched_setaffinity(0, sizeof one, &one) == 0)
		(void)sched_setaffinity(0, sizeof c->cpus, &c->cpus);
}

/* The next request of a connection (in c->first, or c->in when larger) and its size;
 * NULL when the connection ends or breaks. One recv takes the header and, mostly, the
 * whole request; a client may send a pair at once (an operation's init with its next
 * call: protocol/README.md, "Data plane"), whose second request is then taken from what
 * the recv took. The header: the CPU hint (follow), then the request's length in 24 bits
 * (a client without hints sends 0 there: its requests are far below 16 MiB). */
static const uint8_t *next_request(struct conn *c, uint32_t *size)
{
	const uint8_t *h;
	size_t had;

	if (c->boxed) {  /* the mailbox's copy holds whole frames, or the request is bad */
		uint8_t hint;

		h = p11p_fast_frame(c->boxin, &c->pos, c->have, size, &hint);
		if (h != NULL)
			follow(c, hint);
		return h;
	}
	if (c->pos == c->have)
		c->pos = c->have = 0;
	while (c->have - c->pos < 4) {
		ssize_t k;

		if (c->pos > 0) {  /* a header cut by the last recv: to the front */
			memmove(c->first, c->first + c->pos, c->have - c->pos);
			c->have -= c->pos;
			c->pos = 0;
		}
		do
			k = recv(c->fd, c->first + c->have, sizeof c->first - c->have, 0);
		while (k < 0 && errno == EINTR);
		if (k <= 0)
			return NULL;
		c->have += (size_t)k;
	}
	h = c->first + c->pos;
	*size = (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
	follow(c, h[0]);
	if (*size > FAST_MAX_FRAME)
		return NULL;
	c->pos += 4;
	had = c->have - c->pos;
	if (had >= *size) {
		c->pos += *size;
		return h + 4;
	}
	if (*size > c->in_cap) {
		uint8_t *p = realloc(c->in, *size);

		if (p == NULL)
			return NULL;
		c->in = p;
		c->in_cap = *size;
	}
	memcpy(c->in, c->first + c->pos, had);
	c->pos = c->have = 0;
	if (io_all(c->fd, c->in + had, *size - had, 0) != 0)
		return NULL;
	return c->in;
}

/* The held replies and `out`, in one send: the client reads them at one wake-up. */
static int send_replies(struct conn *c)
{
	struct iovec iov[2] = {
		{ c->held.data, c->held.size }, { c->out.data, c->out.size },
	};
	struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2 };
	size_t left = c->held.size + c->out.size;

	if (c->held.size == 0)
		return io_all(c->fd, c->out.data, c->out.size, 1);
	while (left > 0) {
		ssize_t k = sendmsg(c->fd, &m, MSG_NOSIGNAL);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		left -= (size_t)k;
		while (m.msg_iovlen > 0 && (size_t)k >= m.msg_iov->iov_len) {
			k -= (ssize_t)m.msg_iov->iov_len;
			m.msg_iov++;
			m.msg_iovlen--;
		}
		if (m.msg_iovlen > 0) {
			m.msg_iov->iov_base = (char *)m.msg_iov->iov_base + k;
			m.msg_iov->iov_len -= (size_t)k;
		}
	}
	msgpack_sbuffer_clear(&c->held);
	return 0;
}


/* ---- the mailbox (protocol/p11p-box.h) ---- */

void p11p_box_close(struct p11p_box *box)
{
	atomic_store(&box->word, P11P_BOX_CLOSED);
	(void)p11p_box_futex(&box->word, FUTEX_WAKE, INT_MAX, NULL);
}

/* The mailbox the client asked for (its first zero-length frame): made, mapped, sealed
 * at its size (the client cannot shrink it under this process), and passed to the client
 * in a zero-length frame; when it cannot be made, the frame comes without it and the
 * connection stays on the socket. 0, or -1: the connection ends. */
static int box_make(struct conn *c)
{
	char ctl[CMSG_SPACE(sizeof(int))];
	uint8_t head[4] = { 0, 0, 0, 0 };
	struct iovec iov = { head, sizeof head };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;
	void *map = MAP_FAILED;
	ssize_t k;
	int fd;

	fd = memfd_create("p11p-box", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd >= 0 && ftruncate(fd, P11P_BOX_SIZE) == 0 &&
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0)
		map = mmap(NULL, P11P_BOX_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	c->boxin = map != MAP_FAILED ? malloc(P11P_BOX_AREA) : NULL;
	if (c->boxin != NULL) {
		memset(ctl, 0, sizeof ctl);
		m.msg_control = ctl;
		m.msg_controllen = sizeof ctl;
		cm = CMSG_FIRSTHDR(&m);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cm), &fd, sizeof fd);
	}
	do
		k = sendmsg(c->fd, &m, MSG_NOSIGNAL);
	while (k < 0 && errno == EINTR);
	if (fd >= 0)
		close(fd);
	if (c->boxin == NULL || k != (ssize_t)sizeof head) {  /* 4 bytes: never short */
		if (map != MAP_FAILED)
			munmap(map, P11P_BOX_SIZE);
		free(c->boxin);
		c->boxin = NULL;
		return k == (ssize_t)sizeof head ? 0 : -1;
	}
	c->box = map;
	pthread_mutex_lock(&p11p_fast.lock);
	p11p_fast.boxes[c->place] = c->box;  /* next_application closes it */
	pthread_mutex_unlock(&p11p_fast.lock);
	return 0;
}

/* Waits for the client's next request in the mailbox and takes a copy of it: 1; the
 * thread goes back to the socket (idle a while, or the client's request is too large
 * for the mailbox): 0; the connection ends: -1. */
static int box_next(struct conn *c)
{
	struct p11p_box *b = c->box;
	const struct timespec idle = { 0, BOX_IDLE_NS };

	for (;;) {
		uint32_t w = atomic_load(&b->word), n;

		if (w == P11P_BOX_REQUEST) {
			n = atomic_load_explicit(&b->req_len, memory_order_relaxed);
			if (n == 0 || n > P11P_BOX_AREA)
				return -1;
			memcpy(c->boxin, b->req, n);  /* the client cannot change it under the codec */
			c->pos = 0;
			c->have = n;
			return 1;
		}
		if (w == P11P_BOX_SOCKET)
			break;
		if (w != P11P_BOX_READY && w != P11P_BOX_REPLY)
			return -1;  /* closed by next_application, or nonsense */
		if (p11p_box_futex(&b->word, FUTEX_WAIT, w, &idle) == 0 || errno != ETIMEDOUT)
			continue;
		if (w == P11P_BOX_READY) {
			if (atomic_compare_exchange_strong(&b->word, &w, P11P_BOX_SOCKET))
				break;
		} else if (p11p_box_peer_gone(c->fd)) {
			return -1;  /* the reply was never taken */
		}
	}
	c->boxed = 0;
	c->pos = c->have = 0;
	return 0;
}

/* The replies of the mailbox's request, held and `out` (the last ones of the request or
 * not): in the reply area when they are the last and fit; on the socket otherwise, the
 * mailbox saying so first. The client takes them and stores READY. 0, or -1: the
 * connection ends. */
static int box_send(struct conn *c, int last)
{
	struct p11p_box *b = c->box;
	size_t n = c->held.size + c->out.size;

	if (!c->spilled && last && n <= P11P_BOX_AREA) {
		if (c->held.size > 0)  /* an sbuffer with nothing held has no data (NULL) */
			memcpy(b->rep, c->held.data, c->held.size);
		memcpy(b->rep + c->held.size, c->out.data, c->out.size);
		msgpack_sbuffer_clear(&c->held);
		atomic_store_explicit(&b->rep_len, (uint32_t)n, memory_order_relaxed);
	} else if (!c->spilled) {
		atomic_store_explicit(&b->rep_len, P11P_BOX_ON_SOCKET, memory_order_relaxed);
		c->spilled = 1;
	} else {
		return send_replies(c);  /* announced before */
	}
	atomic_store(&b->word, P11P_BOX_REPLY);
	(void)p11p_box_futex(&b->word, FUTEX_WAKE, 1, NULL);
	if (!c->spilled)
		return 0;
	return send_replies(c);
}

static void *conn_main(void *arg)
{
	struct conn *c = arg;
	struct ucred cred;
	socklen_t clen = sizeof cred;

	if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0 ||
	    hello(c->fd, cred.uid) != 0)
		goto out;
	(void)pthread_setname_np(pthread_self(), "p11p-plane");  /* ps -L, top -H */
	if (sched_getaffinity(0, sizeof c->cpus, &c->cpus) != 0)
		CPU_ZERO(&c->cpus);  /* no hint followed */
	for (;;) {
		uint32_t size;
		const uint8_t *req;

		if (c->boxed && c->pos == c->have) {
			int r = box_next(c);

			if (r < 0)
				break;
		}
		req = next_request(c, &size);
		if (req == NULL)
			break;
		if (size == 0) {
			/* the first: the client asks for a mailbox; later: the nudge, its request
			 * is in the mailbox (and nothing else is on the way) */
			if (c->boxed || c->pos != c->have)
				break;
			if (c->box == NULL ? box_make(c) != 0 : (c->boxed = 1, box_next(c) != 1))
				break;
			continue;
		}
		if (p11p_fast_serve(&p11p_fast_calls, (const char *)req, size, &c->out) != 0)
			break;
		uint32_t body = (uint32_t)(c->out.size - 4);
		c->out.data[0] = (char)(body >> 24);
		c->out.data[1] = (char)(body >> 16);
		c->out.data[2] = (char)(body >> 8);
		c->out.data[3] = (char)body;
		/* a request of the pair waits: its reply goes with this one */
		if (c->pos < c->have && c->held.size + c->out.size <= FAST_HOLD) {
			if (msgpack_sbuffer_write(&c->held, c->out.data, c->out.size) != 0)
				break;
			continue;
		}
		if (c->boxed) {
			int last = c->pos == c->have;

			if (box_send(c, last) != 0)
				break;
			if (last)
				c->spilled = 0;
			continue;
		}
		if (send_replies(c) != 0)
			break;
	}
out:
	pthread_mutex_lock(&p11p_fast.lock);
	p11p_fast.fds[c->place] = 0;  /* before the close: p11p_fast_start shuts only open ones */
	p11p_fast.boxes[c->place] = NULL;
	p11p_fast.conns--;
	pthread_mutex_unlock(&p11p_fast.lock);
	close(c->fd);
	free(c->in);
	if (c->box != NULL) {
		p11p_box_close(c->box);  /* a client waiting learns it now, not at its next look */
		munmap(c->box, P11P_BOX_SIZE);
	}
	free(c->boxin);
	msgpack_sbuffer_destroy(&c->out);
	msgpack_sbuffer_destroy(&c->held);
	free(c);
	return NULL;
}

static int start_thread(void *(*fn)(void *), void *arg)
{
	pthread_attr_t attr;
	pthread_t t;
	int err;

	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	err = pthread_create(&t, &attr, fn, arg);
	pthread_attr_destroy(&attr);
	return err;
}

static void *accept_main(void *arg)
{
	int lfd = (int)(intptr_t)arg;

	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				usleep(10000);
				continue;
			}
			return NULL;
		}
		struct ucred cred;
		socklen_t clen = sizeof cred;
		struct conn *c = NULL;
		unsigned place = FAST_MAX_CONNS;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) == 0 &&
		    (c = calloc(1, sizeof *c)) != NULL) {
			pthread_mutex_lock(&p11p_fast.lock);
			/* another uid's connection is closed at once (again in hello: the uid
			 * may change meanwhile) */
			for (unsigned k = 0; k < FAST_MAX_CONNS && p11p_fast.conns < FAST_MAX_CONNS &&
			     cred.uid == p11p_fast.uid; k++) {
				if (p11p_fast.fds[k] == 0) {
					p11p_fast.fds[k] = fd + 1;
					p11p_fast.conns++;
					place = k;
					break;
				}
			}
			pthread_mutex_unlock(&p11p_fast.lock);
		}
		/* the token is checked in its thread (hello) */
		if (place == FAST_MAX_CONNS ||
		    (c->fd = fd, c->place = place, msgpack_sbuffer_init(&c->out),
		     msgpack_sbuffer_init(&c->held),
		     start_thread(conn_main, c) != 0)) {
			if (place < FAST_MAX_CONNS) {
				pthread_mutex_lock(&p11p_fast.lock);
				p11p_fast.fds[place] = 0;
				p11p_fast.conns--;
				pthread_mutex_unlock(&p11p_fast.lock);
			}
			close(fd);
			free(c);
		}
	}
}

int p11p_fast_accept(int fd)
{
	return start_thread(accept_main, (void *)(intptr_t)fd);
}
