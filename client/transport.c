/* p11p client — the transport: connect, frames, deadlines (the hello: hello.c). Every failure is
 * CKR_DEVICE_ERROR (CKR_HOST_MEMORY when memory runs out; P11P_RV_NO_DAEMON when
 * connect finds nobody at the socket, with errno saying why); the caller drops the
 * connection. Sockets are non-blocking and every wait is a poll() bounded by the
 * deadline, so a daemon that accepts and never answers cannot hang a call that has a
 * time-out. Sends use MSG_NOSIGNAL: a closed daemon never raises SIGPIPE in the
 * application. */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>


#include "codec.h"
#include "debug.h"
#include "link.h"
#include "transport.h"

int64_t p11p_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t p11p_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t p11p_deadline(int timeout_ms)
{
	return timeout_ms > 0 ? p11p_now_ms() + timeout_ms : -1;
}

/* Waits for events on fd until the deadline: 0 when ready (or in error: the next
 * send/recv says which), -1 when the deadline passed. */
int p11p_wait_fd(int fd, short events, int64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int timeout = -1, r;

		if (deadline >= 0) {
			int64_t left = deadline - p11p_now_ms();

			if (left <= 0)
				return -1;
			timeout = left > INT_MAX ? INT_MAX : (int)left;
		}
		r = poll(&p, 1, timeout);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return -1;
	}
}

static int send_all(int fd, const char *buf, size_t len, int64_t deadline)
{
	while (len > 0) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n > 0) {
			buf += n;
			len -= (size_t)n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (p11p_wait_fd(fd, POLLOUT, deadline) != 0) {
				p11p_debug("send: time-out");
				return -1;
			}
		} else {
			p11p_debug("send: %s", strerror(errno));
			return -1;
		}
	}
	return 0;
}

#define P11P_RECV_FIRST 4096u  /* what the first recv of a reply takes at most */

/* Reads into buf until at least `want` bytes came (at most cap): how many came, or -1
 * (closed, time-out, error). */
static ssize_t recv_upto(int fd, char *buf, size_t cap, size_t want, int64_t deadline)
{
	size_t got = 0;

	while (got < want) {
		ssize_t n = recv(fd, buf + got, cap - got, 0);

		if (n > 0) {
			got += (size_t)n;
		} else if (n == 0) {
			p11p_debug("recv: connection closed by the daemon");
			return -1;
		} else if (errno == EINTR) {
			continue;
		} else if (errno == EAGAIN || errno == EWOULDBLOCK) {
			if (p11p_wait_fd(fd, POLLIN, deadline) != 0) {
				p11p_debug("recv: time-out");
				return -1;
			}
		} else {
			p11p_debug("recv: %s", strerror(errno));
			return -1;
		}
	}
	return (ssize_t)got;
}

static int recv_all(int fd, char *buf, size_t len, int64_t deadline)
{
	return recv_upto(fd, buf, len, len, deadline) < 0 ? -1 : 0;
}

int p11p_socket_new(void)
{
	return socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
}

/* connect() errors that mean no daemon serves this process at the path */
static int nobody_there(int err)
{
	return err == ENOENT || err == ECONNREFUSED || err == EACCES || err == ENOTDIR;
}

/* A failed connect: its code, with errno set to err for the caller's message. */
static CK_RV connect_failed(const char *path, int err)
{
	p11p_debug("connect %s: %s", path, strerror(err));
	errno = err;
	return nobody_there(err) ? P11P_RV_NO_DAEMON : CKR_DEVICE_ERROR;
}

CK_RV p11p_socket_connect(int fd, const char *path, int64_t deadline)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t n = strlen(path);

	if (n == 0 || n >= sizeof sa.sun_path)
		return connect_failed("(empty or too long)", ENAMETOOLONG);
	memcpy(sa.sun_path, path, n);
	for (;;) {
		int err = 0;
		socklen_t len = sizeof err;

		if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
			return CKR_OK;
		if (errno == EAGAIN) {
			/* the daemon's listen backlog is full: try again until the deadline */
			struct timespec pause = { 0, 5 * 1000 * 1000 };

			if (deadline >= 0 && p11p_now_ms() >= deadline)
				break;
			nanosleep(&pause, NULL);
			continue;
		}
		if (errno != EINPROGRESS && errno != EINTR)
			return connect_failed(path, errno);
		if (p11p_wait_fd(fd, POLLOUT, deadline) != 0)
			break;
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
			return connect_failed(path, errno);
		if (err != 0)
			return connect_failed(path, err);
		return CKR_OK;
	}
	return connect_failed(path, ETIMEDOUT);
}

/* The header: the body's length in the last `limit`'s bytes, and `first` (>= 0) in the
 * first byte, or the length's top byte. -1 when the body is over `limit`. */
static int put_header(char *frame, size_t len, size_t limit, int first)
{
	size_t body = len - P11P_FRAME_HEADER;

	if (len < P11P_FRAME_HEADER || body > limit)
		return -1;
	frame[0] = (char)(first >= 0 ? (size_t)first : body >> 24);
	frame[1] = (char)(body >> 16);
	frame[2] = (char)(body >> 8);
	frame[3] = (char)body;
	return 0;
}

static CK_RV send_framed(int fd, char *frame, size_t len, int64_t deadline, size_t limit,
			 int first)
{
	if (put_header(frame, len, limit, first) != 0)
		return CKR_DEVICE_ERROR;
	return send_all(fd, frame, len, deadline) == 0 ? CKR_OK : CKR_DEVICE_ERROR;
}

static int hint_byte(int cpu)
{
	return cpu >= 0 && cpu < 255 ? cpu + 1 : 0;
}

CK_RV p11p_send_frame(int fd, char *frame, size_t len, int64_t deadline)
{
	return send_framed(fd, frame, len, deadline, UINT32_MAX, -1);
}

CK_RV p11p_send_hinted(int fd, char *frame, size_t len, int64_t deadline, int cpu)
{
	/* the length has three bytes: data-plane requests are far below 16 MiB (inputs up
	 * to 1 MiB), and a larger one is refused as the helper would refuse it */
	return send_framed(fd, frame, len, deadline, (1u << 24) - 1, hint_byte(cpu));
}

int p11p_put_hinted(char *frame, size_t len, int cpu)
{
	return put_header(frame, len, (1u << 24) - 1, hint_byte(cpu));
}

CK_RV p11p_send_pair(int fd, char *a, size_t alen, char *b, size_t blen, int64_t deadline,
		     int cpu)
{
	struct iovec iov[2] = { { a, alen }, { b, blen } };
	struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2 };

	if (put_header(a, alen, (1u << 24) - 1, hint_byte(cpu)) != 0 ||
	    put_header(b, blen, (1u << 24) - 1, hint_byte(cpu)) != 0)
		return CKR_DEVICE_ERROR;
	while (m.msg_iovlen > 0) {
		ssize_t n = sendmsg(fd, &m, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (p11p_wait_fd(fd, POLLOUT, deadline) != 0)
				return CKR_DEVICE_ERROR;
			continue;
		}
		if (n <= 0)
			return CKR_DEVICE_ERROR;
		while (m.msg_iovlen > 0 && (size_t)n >= m.msg_iov->iov_len) {
			n -= (ssize_t)m.msg_iov->iov_len;
			m.msg_iov++;
			m.msg_iovlen--;
		}
		if (m.msg_iovlen > 0) {
			m.msg_iov->iov_base = (char *)m.msg_iov->iov_base + n;
			m.msg_iov->iov_len -= (size_t)n;
		}
	}
	return CKR_OK;
}

/* One frame body from the `had` bytes at `have` (what a recv took: part of a frame, or
 * more than one) and then the socket, reading no byte past the frame; *used: the bytes
 * of `have` it took. */
static CK_RV take_frame(int fd, const char *have, size_t had, char **body, size_t *len,
			size_t *used, int64_t deadline)
{
	unsigned char h[P11P_FRAME_HEADER];
	size_t hh = had < sizeof h ? had : sizeof h, take;
	uint32_t n;
	char *buf;

	*body = NULL;
	*len = 0;
	memcpy(h, have, hh);
	if (recv_all(fd, (char *)h + hh, sizeof h - hh, deadline) != 0)
		return CKR_DEVICE_ERROR;
	n = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
	if (n == 0 || n > P11P_MAX_REPLY) {
		p11p_debug("reply frame of %u bytes refused", n);
		return CKR_DEVICE_ERROR;
	}
	if ((buf = malloc(n)) == NULL)
		return CKR_HOST_MEMORY;
	take = had - hh < n ? had - hh : n;
	memcpy(buf, have + hh, take);
	if (recv_all(fd, buf + take, n - take, deadline) != 0) {
		free(buf);
		return CKR_DEVICE_ERROR;
	}
	*used = hh + take;
	*body = buf;
	*len = n;
	return CKR_OK;
}

CK_RV p11p_recv_two(int fd, char **a, size_t *alen, char **b, size_t *blen, int64_t deadline)
{
	char first[P11P_RECV_FIRST];
	ssize_t got = recv_upto(fd, first, sizeof first, 1, deadline);
	size_t used = 0, used2 = 0;
	CK_RV rv;

	*a = *b = NULL;
	*alen = *blen = 0;
	if (got < 0)
		return CKR_DEVICE_ERROR;
	rv = take_frame(fd, first, (size_t)got, a, alen, &used, deadline);
	if (rv == CKR_OK)
		rv = take_frame(fd, first + used, (size_t)got - used, b, blen, &used2, deadline);
	if (rv == CKR_OK && used + used2 < (size_t)got) { /* bytes past the two: a broken peer */
		p11p_debug("%zu bytes came past a pair's replies", (size_t)got - used - used2);
		free(*b);
		*b = NULL;
		rv = CKR_DEVICE_ERROR;
	}
	if (rv != CKR_OK) {
		free(*a);
		*a = NULL;
	}
	return rv;
}

/* One recv takes the header and, mostly, the whole body: a connection carries one
 * request at a time, so at most one reply is ever on its way, and bytes past it are a
 * broken peer, unless they begin `may_follow` (then *followed is set). */
static CK_RV recv_reply(int fd, char **body, size_t *len, int64_t deadline,
			const unsigned char *may_follow, size_t follow_len, int *followed)
{
	char first[P11P_RECV_FIRST];
	ssize_t got = recv_upto(fd, first, sizeof first, P11P_FRAME_HEADER, deadline);
	size_t used = 0, past;
	CK_RV rv;

	*body = NULL;
	*len = 0;
	if (got < 0)
		return CKR_DEVICE_ERROR;
	rv = take_frame(fd, first, (size_t)got, body, len, &used, deadline);
	past = (size_t)got - used;
	if (rv != CKR_OK || past == 0)
		return rv;
	if (may_follow != NULL && past <= follow_len && memcmp(first + used, may_follow, past) == 0) {
		*followed = 1;
		return CKR_OK;
	}
	p11p_debug("%zu bytes came past a reply", past);
	free(*body);
	*body = NULL;
	*len = 0;
	return CKR_DEVICE_ERROR;
}

CK_RV p11p_recv_frame(int fd, char **body, size_t *len, int64_t deadline)
{
	return recv_reply(fd, body, len, deadline, NULL, 0, NULL);
}

CK_RV p11p_recv_then(int fd, char **body, size_t *len, int64_t deadline,
		     const unsigned char *may_follow, size_t follow_len, int *followed)
{
	*followed = 0;
	return recv_reply(fd, body, len, deadline, may_follow, follow_len, followed);
}

int p11p_socket_idle_ok(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN | POLLRDHUP };

	return poll(&p, 1, 0) == 0;
}
