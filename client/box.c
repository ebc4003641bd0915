/* p11p client — a data-plane connection's mailbox (box.h, protocol/p11p-box.h). The
 * helper's bytes are copied out of the shared pages before anything reads them. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "box.h"
#include "codec.h"
#include "transport.h"

#define BOX_LOOK_MS 20  /* a wait on the word looks at the socket this often (a helper gone) */

struct p11p_box *p11p_box_ask(int fd, int64_t deadline, int *broken)
{
	char head[4] = { 0, 0, 0, 0 }, got[4];
	char ctl[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { got, sizeof got };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;
	struct stat st;
	size_t have = 0;
	int box_fd = -1, seals;
	void *map;

	*broken = 1;
	if (p11p_send_frame(fd, head, sizeof head, deadline) != CKR_OK)
		return NULL;
	while (have < sizeof got) {
		ssize_t k;

		if (p11p_wait_fd(fd, POLLIN, deadline) != 0)
			goto fail;
		iov.iov_base = got + have;
		iov.iov_len = sizeof got - have;
		m.msg_control = box_fd < 0 ? ctl : NULL;  /* the fd comes with the first byte */
		m.msg_controllen = box_fd < 0 ? sizeof ctl : 0;
		k = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
		if (k < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (k <= 0 || (m.msg_flags & MSG_CTRUNC))
			goto fail;
		for (cm = box_fd < 0 ? CMSG_FIRSTHDR(&m) : NULL; cm != NULL; cm = CMSG_NXTHDR(&m, cm)) {
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS &&
			    cm->cmsg_len == CMSG_LEN(sizeof(int)) && box_fd < 0)
				memcpy(&box_fd, CMSG_DATA(cm), sizeof box_fd);
		}
		have += (size_t)k;
	}
	if (memcmp(got, head, sizeof got) != 0)
		goto fail;
	*broken = 0;  /* the connection is fine from here: a box that is not right goes unused */
	if (box_fd < 0)
		return NULL;
	seals = fcntl(box_fd, F_GET_SEALS);
	map = MAP_FAILED;
	/* sealed at its size: the helper cannot shrink it under this process (SIGBUS) */
	if (fstat(box_fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == P11P_BOX_SIZE &&
	    seals >= 0 && (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) == (F_SEAL_SHRINK | F_SEAL_GROW))
		map = mmap(NULL, P11P_BOX_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, box_fd, 0);
	close(box_fd);
	return map == MAP_FAILED ? NULL : map;
fail:
	if (box_fd >= 0)
		close(box_fd);
	return NULL;
}

void p11p_box_drop(struct p11p_box *box)
{
	uint32_t w = P11P_BOX_READY;

	if (box == NULL)
		return;
	/* a thread waiting on an idle mailbox ends now, not when it next looks */
	if (atomic_compare_exchange_strong(&box->word, &w, P11P_BOX_CLOSED))
		(void)p11p_box_futex(&box->word, FUTEX_WAKE, 1, NULL);
	munmap(box, P11P_BOX_SIZE);
}

/* Waits until the replies are there (0), or the connection ends or the deadline passes. */
static int box_wait(int fd, struct p11p_box *box, int64_t deadline, int64_t spin_ns,
		    int (*keep_spinning)(void))
{
	if (spin_ns > 0) {
		int64_t start = p11p_now_ns();

		while (atomic_load(&box->word) == P11P_BOX_REQUEST && keep_spinning() &&
		       p11p_now_ns() - start < spin_ns) {
#if defined(__x86_64__) || defined(__i386__)
			__builtin_ia32_pause();
#endif
		}
	}
	for (;;) {
		uint32_t w = atomic_load(&box->word);
		int64_t ms = BOX_LOOK_MS;
		struct timespec t;

		if (w == P11P_BOX_REPLY)
			return 0;
		if (w != P11P_BOX_REQUEST)
			return -1;  /* closed */
		if (deadline >= 0) {
			int64_t left = deadline - p11p_now_ms();

			if (left <= 0)
				return -1;
			if (left < ms)
				ms = left;
		}
		t.tv_sec = 0;
		t.tv_nsec = (long)ms * 1000000L;
		if (p11p_box_futex(&box->word, FUTEX_WAIT, w, &t) != 0 && errno == ETIMEDOUT &&
		    p11p_box_peer_gone(fd))
			return -1;
	}
}

int p11p_box_take(const struct p11p_box *box, uint32_t n, char **ra, size_t *ralen,
		  char **rb, size_t *rblen)
{
	char **out[2] = { ra, rb };
	size_t *lens[2] = { ralen, rblen };
	unsigned want = rb != NULL ? 2 : 1;
	uint8_t *copy;
	size_t pos = 0;

	if (n > P11P_BOX_AREA || (copy = malloc(n > 0 ? n : 1)) == NULL)
		return -1;
	memcpy(copy, box->rep, n);  /* the helper's bytes cannot change under the parse */
	for (unsigned i = 0; i < want; i++) {
		size_t len;

		if (n - pos < P11P_FRAME_HEADER)
			break;
		len = (size_t)copy[pos] << 24 | (size_t)copy[pos + 1] << 16 |
		      (size_t)copy[pos + 2] << 8 | copy[pos + 3];
		pos += P11P_FRAME_HEADER;
		if (len > n - pos || (*out[i] = malloc(len > 0 ? len : 1)) == NULL)
			break;
		memcpy(*out[i], copy + pos, len);
		*lens[i] = len;
		pos += len;
		if (i + 1 == want && pos == n) {
			free(copy);
			return 0;
		}
	}
	free(copy);
	for (unsigned i = 0; i < want; i++) {
		free(*out[i]);
		*out[i] = NULL;
	}
	return -1;
}

int p11p_box_round(int fd, struct p11p_box *box, char *a, size_t alen, char *b, size_t blen,
		   int cpu, int64_t deadline, int64_t spin_ns, int (*keep_spinning)(void),
		   char **ra, size_t *ralen, char **rb, size_t *rblen)
{
	size_t total = alen + (b != NULL ? blen : 0);
	uint32_t w = atomic_load(&box->word), n;

	*ra = NULL;
	if (rb != NULL)
		*rb = NULL;
	if (total > P11P_BOX_AREA || p11p_put_hinted(a, alen, cpu) != 0 ||
	    (b != NULL && p11p_put_hinted(b, blen, cpu) != 0)) {
		/* to the socket: the helper's thread is sent there if it watches the word */
		if (w == P11P_BOX_READY &&
		    atomic_compare_exchange_strong(&box->word, &w, P11P_BOX_SOCKET))
			(void)p11p_box_futex(&box->word, FUTEX_WAKE, 1, NULL);
		else if (w != P11P_BOX_SOCKET)
			return -1;
		return 1;
	}
	if (w != P11P_BOX_READY && w != P11P_BOX_SOCKET)
		return -1;
	memcpy(box->req, a, alen);
	if (b != NULL)
		memcpy(box->req + alen, b, blen);
	atomic_store_explicit(&box->req_len, (uint32_t)total, memory_order_relaxed);
	if (w == P11P_BOX_READY &&
	    atomic_compare_exchange_strong(&box->word, &w, P11P_BOX_REQUEST)) {
		(void)p11p_box_futex(&box->word, FUTEX_WAKE, 1, NULL);
	} else if (w == P11P_BOX_SOCKET) {
		/* the thread reads the socket (idle a while): the nudge sends it to the box */
		char nudge[P11P_FRAME_HEADER] = { 0, 0, 0, 0 };

		atomic_store(&box->word, P11P_BOX_REQUEST);
		if (p11p_send_frame(fd, nudge, sizeof nudge, deadline) != CKR_OK)
			return -1;
	} else {
		return -1;
	}
	if (box_wait(fd, box, deadline, spin_ns, keep_spinning) != 0)
		return -1;
	n = atomic_load_explicit(&box->rep_len, memory_order_relaxed);
	if (n == P11P_BOX_ON_SOCKET) {
		CK_RV rv = rb != NULL ? p11p_recv_two(fd, ra, ralen, rb, rblen, deadline)
				      : p11p_recv_frame(fd, ra, ralen, deadline);

		if (rv != CKR_OK)
			return -1;
	} else if (p11p_box_take(box, n, ra, ralen, rb, rblen) != 0) {
		return -1;
	}
	/* closed meanwhile (CAS fails): the replies stand, the connection does not (the
	 * caller gives it back, which closes a mailbox not READY) */
	w = P11P_BOX_REPLY;
	(void)atomic_compare_exchange_strong(&box->word, &w, P11P_BOX_READY);
	return 0;
}
