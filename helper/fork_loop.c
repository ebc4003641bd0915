/* p11p helper — the fork server's request loop (helper/forkserver.py), in C: waits for
 * the daemon's fork requests, forks a helper for each, answers, reaps the helpers that
 * end and reports them, and returns to Python only in a new helper or for what is not
 * that common path (SIGTERM, the link's end, a malformed request, a failed fork).
 *
 * Why C: a page the server writes after a fork is copied, and the copy it leaves
 * behind is the new helper's alone. A Python loop writes the reference counts of what
 * it touches (its code, its objects, the modules it uses): some 90 pages between two
 * forks. This loop writes its stack, its receive buffer and the few words below.
 *
 * The fork is os.fork()'s, less what would run Python in the server (fork_interpreter).
 *
 * The link's messages are forkserver.py's: [n, module] with two fds in; [n, pid] with
 * a pidfd, and [-1, pid, wait status], out (msgpack). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define FORK_MAX_MESSAGE (1u << 20)  /* a request bigger than this is malformed */
#define FORK_MAX_FDS 4               /* more fds than this are dropped by the kernel */

enum p11p_fork_event {
	P11P_FORK_CHILD = 1,   /* in the new helper: request holds its number, module, fds */
	P11P_FORK_SIGTERM,     /* the daemon ended (PR_SET_PDEATHSIG) */
	P11P_FORK_EOF,         /* the link ended */
	P11P_FORK_MALFORMED,   /* a request that is not [n, module] with two fds: number is
	                        * its first item when that is an integer, else 0 (its fds
	                        * are closed) */
	P11P_FORK_FAILED,      /* fork() failed: number, error (its fds are closed) */
	P11P_FORK_ERROR,       /* a system call failed: error */
};

struct p11p_fork_request {
	long long number;
	const char *module;    /* in the receive buffer; not NUL-terminated */
	size_t module_len;
	int in_fd, out_fd;
	int error;
};

static unsigned char fork_buf[FORK_MAX_MESSAGE];
static int fork_children;  /* forked and not yet reaped */
static int fork_wake[2] = { -1, -1 };  /* the signals' pipe */

/* ---- msgpack, the little of it these messages use ---- */

/* An integer (any of its encodings) that fits a long long. */
static int mp_int_read(const unsigned char **p, const unsigned char *end, long long *value)
{
	const unsigned char *q = *p;
	unsigned n, i;
	uint64_t v = 0;
	int sign = 0;

	if (q >= end)
		return -1;
	if (*q <= 0x7f || *q >= 0xe0) {  /* positive, negative fixint */
		*value = (signed char)*q;
		*p = q + 1;
		return 0;
	}
	switch (*q) {
	case 0xcc: n = 1; break;
	case 0xcd: n = 2; break;
	case 0xce: n = 4; break;
	case 0xcf: n = 8; break;
	case 0xd0: n = 1; sign = 1; break;
	case 0xd1: n = 2; sign = 1; break;
	case 0xd2: n = 4; sign = 1; break;
	case 0xd3: n = 8; sign = 1; break;
	default: return -1;
	}
	if ((size_t)(end - q) < 1 + n)
		return -1;
	for (i = 1; i <= n; i++)
		v = v << 8 | q[i];
	if (sign && n < 8 && (q[1] & 0x80))  /* sign-extend */
		v |= ~(uint64_t)0 << (8 * n);
	if (!sign && v > INT64_MAX)
		return -1;
	*value = (long long)v;
	*p = q + 1 + n;
	return 0;
}

static int mp_str(const unsigned char **p, const unsigned char *end, const char **s, size_t *len)
{
	const unsigned char *q = *p;
	size_t n, head;

	if (q >= end)
		return -1;
	if ((*q & 0xe0) == 0xa0) {
		n = *q & 0x1f;
		head = 1;
	} else if (*q == 0xd9 && end - q >= 2) {
		n = q[1];
		head = 2;
	} else if (*q == 0xda && end - q >= 3) {
		n = (size_t)q[1] << 8 | q[2];
		head = 3;
	} else if (*q == 0xdb && end - q >= 5) {
		n = (size_t)q[1] << 24 | (size_t)q[2] << 16 | (size_t)q[3] << 8 | q[4];
		head = 5;
	} else {
		return -1;
	}
	if ((size_t)(end - q) - head < n)
		return -1;
	*s = (const char *)q + head;
	*len = n;
	*p = q + head + n;
	return 0;
}

/* [n, module], n > 0: 0 with both read; else -1, and *number set to the first item
 * when the message is an array that starts with an integer (0 when not). */
static int parse_request(const unsigned char *p, const unsigned char *end,
			 long long *number, const char **module, size_t *module_len)
{
	uint32_t count;

	*number = 0;
	if (p >= end)
		return -1;
	if ((*p & 0xf0) == 0x90) {
		count = *p & 0x0f;
		p += 1;
	} else if (*p == 0xdc && end - p >= 3) {
		count = (uint32_t)p[1] << 8 | p[2];
		p += 3;
	} else if (*p == 0xdd && end - p >= 5) {
		count = (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | p[4];
		p += 5;
	} else {
		return -1;
	}
	if (count == 0 || mp_int_read(&p, end, number) != 0)
		return -1;
	if (count != 2 || *number <= 0 || mp_str(&p, end, module, module_len) != 0 || p != end)
		return -1;
	return 0;
}

static unsigned char *mp_int(unsigned char *p, long long v)
{
	uint64_t u = (uint64_t)v;
	int i;

	*p++ = 0xd3;
	for (i = 7; i >= 0; i--)
		*p++ = (unsigned char)(u >> (8 * i));
	return p;
}

/* Sends one message of `count` integers (and `fd`, when not -1); errors are the
 * daemon's end, which the loop sees as the link's EOF. */
static void send_ints(int link, const long long *values, int count, int fd)
{
	unsigned char out[1 + 3 * 9], *p = out;
	char control[CMSG_SPACE(sizeof(int))];
	struct iovec iov;
	struct msghdr msg;
	int i;

	*p++ = (unsigned char)(0x90 | count);
	for (i = 0; i < count; i++)
		p = mp_int(p, values[i]);
	iov.iov_base = out;
	iov.iov_len = (size_t)(p - out);
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	if (fd >= 0) {
		struct cmsghdr *cmsg;

		memset(control, 0, sizeof(control));
		msg.msg_control = control;
		msg.msg_controllen = sizeof(control);
		cmsg = CMSG_FIRSTHDR(&msg);
		cmsg->cmsg_level = SOL_SOCKET;
		cmsg->cmsg_type = SCM_RIGHTS;
		cmsg->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
	}
	while (sendmsg(link, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR)
		;
}

/* ---- the C heap ---- */

/* Takes, for good, every free chunk of the C library's heap (its main arena): the fast
 * and the ordinary bins', and, the first time, those the thread's cache holds (7 per
 * size, glibc's default). What a helper allocates then comes from the top of the heap,
 * fresh pages packed with its own data, instead of from holes among the server's (each
 * a page copied for a few bytes, and its free list neighbours written as well). The
 * server has no other arena (no thread); it calls this before it serves, and again
 * after Python ran. The bytes taken. */
size_t p11p_fork_fill_heap(void)
{
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
	static int cache_taken;
	size_t taken = 0, size;
	int i;

	/* the cache's sizes: once, as later a request that finds none there takes the top */
	for (size = 24; !cache_taken && size <= 1032; size += 16)
		for (i = 0; i < 7; i++)
			if (malloc(size) != NULL)
				taken += size;
	cache_taken = 1;
	/* a request above the small sizes first merges the fast bins into the others */
	if (malloc(1100) != NULL)
		taken += 1100;
	for (;;) {
		struct mallinfo2 info = mallinfo2();

		if (info.ordblks <= 1 && info.smblks == 0)  /* the top chunk alone */
			break;
		if (taken > ((size_t)256 << 20))  /* whatever this heap is, not that */
			break;
		for (i = 0; i < 256; i++)
			if (malloc(16) != NULL)
				taken += 32;
	}
	return taken;
#else
	return 0;
#endif
}

/* ---- signals ---- */

static void fork_signal(int sig)
{
	int saved = errno;
	unsigned char byte = (unsigned char)sig;

	if (write(fork_wake[1], &byte, 1) < 0) {
		/* full: the loop has news to read already */
	}
	errno = saved;
}

/* SIGCHLD (a helper ended) and SIGTERM (the daemon did) write their number to a pipe,
 * whose read end this returns (-1 with errno). Handled here, not by Python's signal
 * module: a helper puts them back to their defaults without running Python (the
 * signal module's functions, their enum conversions, wrote some 30 kB of pages a
 * helper shares with the server). */
int p11p_fork_signals(void)
{
	struct sigaction action;

	if (pipe2(fork_wake, O_NONBLOCK | O_CLOEXEC) != 0)
		return -1;
	memset(&action, 0, sizeof(action));
	action.sa_handler = fork_signal;
	sigemptyset(&action.sa_mask);
	action.sa_flags = SA_RESTART;
	if (sigaction(SIGCHLD, &action, NULL) != 0 || sigaction(SIGTERM, &action, NULL) != 0)
		return -1;
	return fork_wake[0];
}

/* In a new helper: the signals as a process of its own has them. */
static void signals_to_defaults(void)
{
	signal(SIGCHLD, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	close(fork_wake[0]);
	close(fork_wake[1]);
}

/* ---- the loop ---- */

/* In the stable ABI since 3.7; Python.h declares them for no older limited API than
 * that, and cffi's is older. */
PyAPI_FUNC(void) PyOS_BeforeFork(void);
PyAPI_FUNC(void) PyOS_AfterFork_Parent(void);
PyAPI_FUNC(void) PyOS_AfterFork_Child(void);

/* fork(2) as os.fork() makes it (Modules/posixmodule.c), errno set when it fails; but
 * through Python 3.12 without PyOS_BeforeFork and PyOS_AfterFork_Parent, which would
 * run Python here between two forks: they take and give back the import lock and
 * logging's lock (its at-fork callbacks), which no thread can hold in a server without
 * threads, and PyOS_AfterFork_Child sets the import lock's state whatever it was. From
 * 3.13 it gives back the import lock PyOS_BeforeFork took: both are called there
 * (their callbacks write some 20 pages between two forks). Called without the GIL. */
static pid_t fork_interpreter(void)
{
	PyGILState_STATE gil;
	pid_t pid;

#if PY_VERSION_HEX < 0x030D0000 && !defined(Py_GIL_DISABLED)
	pid = fork();
	if (pid != 0)
		return pid;
	signals_to_defaults();
	gil = PyGILState_Ensure();
	PyOS_AfterFork_Child();
	PyGILState_Release(gil);
	return 0;
#else
	int saved;

	gil = PyGILState_Ensure();
	PyOS_BeforeFork();
	pid = fork();
	saved = errno;
	if (pid == 0) {
		signals_to_defaults();
		PyOS_AfterFork_Child();
	} else
		PyOS_AfterFork_Parent();
	PyGILState_Release(gil);
	errno = saved;
	return pid;
#endif
}

/* Reaps every helper that ended and reports it ([-1, pid, status]); the helpers left. */
int p11p_fork_reap(int link)
{
	for (;;) {
		long long ended[3];
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);

		if (pid < 0 && errno == EINTR)
			continue;
		if (pid < 0) {  /* ECHILD: none left */
			fork_children = 0;
			break;
		}
		if (pid == 0)
			break;
		if (fork_children > 0)
			fork_children--;
		ended[0] = -1;
		ended[1] = pid;
		ended[2] = status;
		send_ints(link, ended, 3, -1);
	}
	return fork_children;
}

int p11p_fork_children(void)
{
	return fork_children;
}

/* The signals' pipe had news: reaps; SIGTERM among them or not. */
static int signalled(int link, int wake)
{
	unsigned char sigs[512];
	ssize_t n, i;
	int term = 0;

	while ((n = read(wake, sigs, sizeof(sigs))) > 0 || (n < 0 && errno == EINTR))
		for (i = 0; i < n; i++)
			term |= sigs[i] == SIGTERM;
	p11p_fork_reap(link);
	return term;
}

/* One request read from the link: forks for it (0 in the child), answers it in the
 * server (> 0: go on), or says why Python must see it (< 0: -event). */
static int one_request(int link, struct p11p_fork_request *request)
{
	char control[CMSG_SPACE(FORK_MAX_FDS * sizeof(int))];
	int fds[FORK_MAX_FDS], nfds = 0, i, event;
	struct iovec iov = { fork_buf, sizeof(fork_buf) };
	struct msghdr msg;
	struct cmsghdr *cmsg;
	ssize_t len;
	pid_t pid;

	request->number = 0;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control;
	msg.msg_controllen = sizeof(control);
	do
		len = recvmsg(link, &msg, 0);
	while (len < 0 && errno == EINTR);
	if (len < 0 && errno == ECONNRESET)
		len = 0;
	if (len < 0) {
		request->error = errno;
		return -P11P_FORK_ERROR;
	}
	for (cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
		int *data = (int *)CMSG_DATA(cmsg);
		size_t count;

		if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
			continue;
		count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < (int)count && nfds < FORK_MAX_FDS; i++)
			memcpy(&fds[nfds++], data + i, sizeof(int));
	}
	event = 0;
	if (len == 0)
		event = P11P_FORK_EOF;
	else if ((msg.msg_flags & MSG_TRUNC)
		 || parse_request(fork_buf, fork_buf + len, &request->number, &request->module,
				  &request->module_len) != 0
		 || nfds != 2)
		event = P11P_FORK_MALFORMED;
	if (event == 0) {
		pid = fork_interpreter();
		if (pid == 0) {
			request->in_fd = fds[0];
			request->out_fd = fds[1];
			return 0;
		}
		if (pid < 0) {
			request->error = errno;
			event = P11P_FORK_FAILED;
		} else {
			/* not reaped yet: the pid is still this child's */
			int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
			long long forked[2];

			fork_children++;
			forked[0] = request->number;
			forked[1] = pid;
			if (pidfd < 0) {  /* as os.pidfd_open raising did: the server ends */
				request->error = errno;
				event = P11P_FORK_ERROR;
			} else {
				send_ints(link, forked, 2, pidfd);
				close(pidfd);
			}
		}
	}
	for (i = 0; i < nfds; i++)
		close(fds[i]);
	return event ? -event : 1;
}

/* Serves fork requests until one of the events above; P11P_FORK_CHILD in a new helper. */
int p11p_fork_serve(int link, int wake, struct p11p_fork_request *request)
{
	for (;;) {
		struct pollfd watched[2] = { { wake, POLLIN, 0 }, { link, POLLIN, 0 } };
		int ready = poll(watched, 2, -1), done;

		if (ready < 0 && errno == EINTR)
			continue;
		if (ready < 0) {
			request->error = errno;
			return P11P_FORK_ERROR;
		}
		if (watched[0].revents && signalled(link, wake))
			return P11P_FORK_SIGTERM;
		if (watched[1].revents) {
			done = one_request(link, request);
			if (done == 0)
				return P11P_FORK_CHILD;
			if (done < 0)
				return -done;
		}
	}
}
