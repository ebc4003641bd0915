/* p11p client tests — reading a data-plane pair's two replies (p11p_recv_two) over a
 * socketpair, the replies cut every way a peer may send them: together, one byte at a
 * time, the second later; and what must fail: bytes past the two, a peer that closes
 * mid-frame, a zero-length frame. Links transport.c with what it needs of the library. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "transport.h"

static int checks, failures;

#define CHECK(ok) do { checks++; if (!(ok)) { failures++; \
	fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__, __LINE__, #ok); } } while (0)

struct feed {
	int fd;
	const unsigned char *data;
	size_t len, step;  /* bytes per write; 0: all at once */
	int close_after;
	useconds_t pause;  /* between writes */
};

static void *feeder(void *arg)
{
	struct feed *f = arg;
	size_t off = 0;

	while (off < f->len) {
		size_t n = f->step ? f->step : f->len;

		if (n > f->len - off)
			n = f->len - off;
		if (write(f->fd, f->data + off, n) != (ssize_t)n)
			break;
		off += n;
		if (f->pause)
			usleep(f->pause);
	}
	if (f->close_after)
		shutdown(f->fd, SHUT_WR);
	return NULL;
}

/* frames "abc" and "defgh" (bodies), then `extra` bytes */
static size_t pair_bytes(unsigned char *out, size_t extra)
{
	static const unsigned char two[] = { 0, 0, 0, 3, 'a', 'b', 'c',
					     0, 0, 0, 5, 'd', 'e', 'f', 'g', 'h' };

	memcpy(out, two, sizeof two);
	memset(out + sizeof two, 'x', extra);
	return sizeof two + extra;
}

static CK_RV run(const unsigned char *data, size_t len, size_t step, useconds_t pause,
		 int close_after, char **a, size_t *al, char **b, size_t *bl)
{
	int sv[2];
	pthread_t t;
	struct feed f;
	CK_RV rv;

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) != 0)
		exit(2);
	f = (struct feed){ sv[1], data, len, step, close_after, pause };
	pthread_create(&t, NULL, feeder, &f);
	rv = p11p_recv_two(sv[0], a, al, b, bl, p11p_deadline(5000));
	pthread_join(t, NULL);
	close(sv[0]);
	close(sv[1]);
	return rv;
}

static void expect_pair(const unsigned char *data, size_t len, size_t step, useconds_t pause)
{
	char *a = NULL, *b = NULL;
	size_t al = 0, bl = 0;

	CHECK(run(data, len, step, pause, 0, &a, &al, &b, &bl) == CKR_OK);
	CHECK(a != NULL && al == 3 && memcmp(a, "abc", 3) == 0);
	CHECK(b != NULL && bl == 5 && memcmp(b, "defgh", 5) == 0);
	free(a);
	free(b);
}

static void expect_broken(const unsigned char *data, size_t len, size_t step, int close_after)
{
	char *a = (char *)1, *b = (char *)1;
	size_t al = 0, bl = 0;

	CHECK(run(data, len, step, 0, close_after, &a, &al, &b, &bl) == CKR_DEVICE_ERROR);
	CHECK(a == NULL && b == NULL);  /* nothing left to free */
}

int main(void)
{
	unsigned char buf[64];
	size_t n = pair_bytes(buf, 0);

	expect_pair(buf, n, 0, 0);          /* both in one write: one recv */
	for (size_t step = 1; step < n; step++)
		expect_pair(buf, n, step, 200); /* cut anywhere, the rest later */
	expect_broken(buf, pair_bytes(buf, 1), 0, 0);      /* a byte past the two */
	expect_broken(buf, pair_bytes(buf, 9), 0, 0);
	for (size_t cut = 1; cut < n; cut++)
		expect_broken(buf, cut, 0, 1);  /* the peer closes mid-frame */
	{
		static const unsigned char empty[] = { 0, 0, 0, 0, 0, 0, 0, 1, 'z' };

		expect_broken(empty, sizeof empty, 0, 1);
	}
	printf("transport test: %d checks, %d failed\n", checks, failures);
	return failures ? 1 : 0;
}
