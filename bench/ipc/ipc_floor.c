/* ipc-floor — what a call's round trip between two processes costs on this machine, apart
 * from p11p: N threads each do a fixed amount of CPU work per "operation", either in
 * process (direct), or by asking a thread of another process to do it and waiting for
 * the answer over a Unix socketpair (socket: what the data plane does) or over shared
 * memory with a futex (futex: as the data plane's mailbox does, protocol/p11p-box.h). The ratios to
 * direct are the ceiling any proxy of that kind reaches for that work on these CPUs
 * (bench/README.md, "The IPC floor"). Usage: ipc-floor [threads [work_us [seconds]]];
 * prints one JSON object per mode. */
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define SLOT 32 /* ints per futex word: one cache line and more apart */

enum mode { DIRECT, SOCKET, FUTEX };
static const char *const mode_name[] = { "direct", "socket", "futex" };

static enum mode mode;
static long work_loops;
static double seconds;
static int socks[MAX_THREADS][2];
static atomic_int *words;
static atomic_long done;
static volatile double sink;

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void work(void)
{
	double x = 1;

	for (long i = 0; i < work_loops; i++)
		x = x * 1.0000001 + 0.5;
	sink = x;
}

static void futex(atomic_int *w, int op, int val)
{
	(void)syscall(SYS_futex, w, op, val, NULL, NULL, 0);
}

/* The other process's thread k: one request, the work, one answer, until the end. */
static void *server(void *arg)
{
	long k = (long)arg;
	char buf[256];
	atomic_int *w = &words[k * SLOT];

	for (;;) {
		if (mode == SOCKET) {
			if (recv(socks[k][1], buf, 200, 0) <= 0)
				return NULL;
			work();
			if (send(socks[k][1], buf, 100, MSG_NOSIGNAL) != 100)
				return NULL;
		} else {
			int v;

			while ((v = atomic_load(w)) % 2 == 0)
				futex(w, FUTEX_WAIT, v);
			work();
			atomic_store(w, v + 1);
			futex(w, FUTEX_WAKE, 1);
		}
	}
}

/* The client's wait as p11p's (client/transport.c): a recv, then poll when nothing came. */
static int ask_socket(int fd, char *buf)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	if (send(fd, buf, 200, MSG_NOSIGNAL) != 200)
		return -1;
	if (recv(fd, buf, 100, MSG_DONTWAIT) == 100)
		return 0;
	if (poll(&p, 1, -1) != 1)
		return -1;
	return recv(fd, buf, 100, 0) == 100 ? 0 : -1;
}

static void ask_futex(atomic_int *w)
{
	int v = atomic_load(w) + 1;

	atomic_store(w, v);
	futex(w, FUTEX_WAKE, 1);
	while (atomic_load(w) == v)
		futex(w, FUTEX_WAIT, v);
}

static void *client(void *arg)
{
	long k = (long)arg, n = 0;
	char buf[256] = { 0 };
	double end = now() + seconds;

	while (now() < end) {
		if (mode == DIRECT)
			work();
		else if (mode == SOCKET && ask_socket(socks[k][0], buf) != 0)
			break;
		else if (mode == FUTEX)
			ask_futex(&words[k * SLOT]);
		n++;
	}
	atomic_fetch_add(&done, n);
	return NULL;
}

/* work_loops for about `us` microseconds of work */
static void calibrate(double us)
{
	double t;

	work_loops = 100000;
	t = now();
	work();
	t = now() - t;
	work_loops = (long)((double)work_loops * us * 1e-6 / (t > 0 ? t : 1e-6));
	if (work_loops < 1)
		work_loops = 1;
}

/* Closes both ends of the first n socketpairs (a run that fails before the fork). */
static void close_pairs(int n)
{
	for (int i = 0; i < n; i++) {
		close(socks[i][0]);
		close(socks[i][1]);
	}
}

static double run(enum mode m, int threads)
{
	pthread_t t[MAX_THREADS];
	pid_t other = -1, self = getpid();
	int started = 0;

	mode = m;
	atomic_store(&done, 0);
	for (int i = 0; i < threads * SLOT; i++)
		atomic_store(&words[i], 0);
	for (int i = 0; i < threads && m == SOCKET; i++) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, socks[i]) != 0) {
			close_pairs(i);
			return -1;
		}
	}
	if (m != DIRECT) {
		other = fork();
		if (other < 0) {
			close_pairs(m == SOCKET ? threads : 0);
			return -1;
		}
		if (other == 0) {
			/* gone with this process, however it ends */
			if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != self)
				_exit(1);
			for (int i = 0; i < threads && m == SOCKET; i++)
				close(socks[i][0]);
			for (long i = 0; i < threads; i++)
				if (pthread_create(&t[i], NULL, server, (void *)i) != 0)
					_exit(1);
			pause();
			_exit(0);
		}
		/* each end in one process only: either side's end is the other's EOF */
		for (int i = 0; i < threads && m == SOCKET; i++)
			close(socks[i][1]);
	}
	while (started < threads &&
	       pthread_create(&t[started], NULL, client, (void *)(long)started) == 0)
		started++;
	for (int i = 0; i < started; i++)
		pthread_join(t[i], NULL);
	if (other > 0) {
		kill(other, SIGKILL);
		waitpid(other, NULL, 0);
	}
	for (int i = 0; i < threads && m == SOCKET; i++)
		close(socks[i][0]);
	return started < threads ? -1 : (double)atomic_load(&done) / seconds;
}

int main(int argc, char **argv)
{
	int threads = argc > 1 ? atoi(argv[1]) : 8;
	double us = argc > 2 ? atof(argv[2]) : 80, direct = 0;

	seconds = argc > 3 ? atof(argv[3]) : 3;
	if (threads < 1 || threads > MAX_THREADS || us <= 0 || seconds <= 0) {
		fprintf(stderr, "usage: ipc-floor [threads 1-%d [work_us [seconds]]]\n", MAX_THREADS);
		return 2;
	}
	words = mmap(NULL, (size_t)MAX_THREADS * SLOT * sizeof *words, PROT_READ | PROT_WRITE,
		     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (words == MAP_FAILED)
		return 1;
	calibrate(us);
	for (enum mode m = DIRECT; m <= FUTEX; m++) {
		double ops = run(m, threads);

		if (ops <= 0) {
			fprintf(stderr, "ipc-floor: %s failed\n", mode_name[m]);
			return 1;
		}
		if (m == DIRECT)
			direct = ops;
		printf("{\"mode\": \"%s\", \"threads\": %d, \"work_us\": %.1f, \"ops_per_s\": %.0f, "
		       "\"vs_direct\": %.3f}\n", mode_name[m], threads, us, ops, ops / direct);
		fflush(stdout);
	}
	return 0;
}
