/* ipc-floor — what a call's round trip between two processes costs on this machine, apart
 * from p11p: N threads each do a fixed amount of CPU work per "operation", either in
 * process (direct), or by asking a thread of another process to do it and waiting for
 * the answer over a Unix socketpair (socket: what the data plane does) or over shared
 * memory with a futex (futex: as the data plane's mailbox does, protocol/p11p-box.h;
 * futex-pinned: the same with each pair of threads held on one CPU, k % CPUs, which no
 * library may do to its application's threads: the ceiling of keeping pairs together).
 * The ratios to direct are the ceiling any proxy of that kind reaches for that work on
 * these CPUs (bench/README.md, "The IPC floor"). The work is a busy loop of work_us, or,
 * given `ecdsa` instead, a signature as p11bench's ecdsa-p256-sign makes it (C_SignInit
 * and C_Sign with the key bench-ec) through the module P11P_FLOOR_MODULE (default
 * SoftHSM2's) on the first token, user PIN 1234 (p11bench --setup makes the key), the
 * other process initializing the module after the fork as a helper does. Usage:
 * ipc-floor [threads [work_us|ecdsa [seconds]]]; prints one JSON object per mode. */
#include <dlfcn.h>
#include <linux/futex.h>
#include <p11-kit/pkcs11.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define SLOT 32 /* ints per futex word: one cache line and more apart */

enum mode { DIRECT, SOCKET, FUTEX, FUTEX_PINNED };
static const char *const mode_name[] = { "direct", "socket", "futex", "futex-pinned" };

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

/* ---- the ecdsa work: a module's signature ---- */

static CK_FUNCTION_LIST_PTR module;   /* NULL: the busy loop */
static const char *module_path;
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE ec_key;
static __thread CK_SESSION_HANDLE my_session;

static void die(const char *what, CK_RV rv)
{
	fprintf(stderr, "ipc-floor: %s failed (0x%lx)\n", what, (unsigned long)rv);
	exit(1);
}

/* Loads and initializes the module, logs in, finds bench-ec's private key. */
static void module_start(void)
{
	CK_C_INITIALIZE_ARGS args;
	CK_C_GetFunctionList get;
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_ATTRIBUTE t[2] = { { CKA_CLASS, &cls, sizeof cls },
			      { CKA_LABEL, (void *)"bench-ec", 8 } };
	CK_SLOT_ID slots[16];
	CK_ULONG n = 16;
	CK_SESSION_HANDLE s;
	CK_RV rv;
	void *h = dlopen(module_path, RTLD_NOW | RTLD_LOCAL);

	if (h == NULL || (get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList")) == NULL ||
	    get(&module) != CKR_OK)
		die(module_path, CKR_GENERAL_ERROR);
	memset(&args, 0, sizeof args);
	args.flags = CKF_OS_LOCKING_OK;
	if ((rv = module->C_Initialize(&args)) != CKR_OK)
		die("C_Initialize", rv);
	if ((rv = module->C_GetSlotList(CK_TRUE, slots, &n)) != CKR_OK || n == 0)
		die("C_GetSlotList (a token)", rv);
	slot = slots[0];
	if ((rv = module->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
					&s)) != CKR_OK)
		die("C_OpenSession", rv);
	if ((rv = module->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)"1234", 4)) != CKR_OK)
		die("C_Login", rv);
	n = 0;
	if (module->C_FindObjectsInit(s, t, 2) != CKR_OK ||
	    module->C_FindObjects(s, &ec_key, 1, &n) != CKR_OK || n != 1)
		die("finding bench-ec (p11bench --setup makes it)", CKR_GENERAL_ERROR);
	(void)module->C_FindObjectsFinal(s);
}

static void sign(void)
{
	CK_MECHANISM m = { CKM_ECDSA, NULL, 0 };
	unsigned char in[32] = { 1 }, out[128];
	CK_ULONG len = sizeof out;
	CK_RV rv;

	if (my_session == 0 &&
	    (rv = module->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &my_session)) != CKR_OK)
		die("C_OpenSession", rv);
	if ((rv = module->C_SignInit(my_session, &m, ec_key)) != CKR_OK ||
	    (rv = module->C_Sign(my_session, in, sizeof in, out, &len)) != CKR_OK)
		die("C_SignInit, C_Sign", rv);
}

/* ---- the work and the two sides ---- */

/* Thread k of a pinned pair: on CPU k % (CPUs this process may use). */
static void pin_pair(long k)
{
	cpu_set_t all, one;
	int seen = -1;

	if (mode != FUTEX_PINNED || sched_getaffinity(0, sizeof all, &all) != 0)
		return;
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (CPU_ISSET(cpu, &all) && ++seen == (int)(k % CPU_COUNT(&all))) {
			CPU_ZERO(&one);
			CPU_SET(cpu, &one);
			(void)sched_setaffinity(0, sizeof one, &one);
			return;
		}
	}
}

static void work(void)
{
	double x = 1;

	if (module_path != NULL) {
		sign();
		return;
	}

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

	pin_pair(k);
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
	double end;

	pin_pair(k);
	if (mode == DIRECT && module_path != NULL)
		sign();  /* its session opened before the clock starts, as the other side's */
	end = now() + seconds;
	while (now() < end) {
		if (mode == DIRECT)
			work();
		else if (mode == SOCKET && ask_socket(socks[k][0], buf) != 0)
			break;
		else if (mode == FUTEX || mode == FUTEX_PINNED)
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
			if (module_path != NULL)
				module_start();  /* after the fork, as a helper */
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
	if (m == DIRECT && module_path != NULL)
		module_start();
	while (started < threads &&
	       pthread_create(&t[started], NULL, client, (void *)(long)started) == 0)
		started++;
	for (int i = 0; i < started; i++)
		pthread_join(t[i], NULL);
	if (m == DIRECT && module_path != NULL)
		(void)module->C_Finalize(NULL);  /* the next mode's other process has its own */
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
	int ecdsa = argc > 2 && strcmp(argv[2], "ecdsa") == 0;
	double us = argc > 2 && !ecdsa ? atof(argv[2]) : 80, direct = 0;
	const char *path = getenv("P11P_FLOOR_MODULE");

	seconds = argc > 3 ? atof(argv[3]) : 3;
	if (threads < 1 || threads > MAX_THREADS || us <= 0 || seconds <= 0) {
		fprintf(stderr, "usage: ipc-floor [threads 1-%d [work_us|ecdsa [seconds]]]\n",
			MAX_THREADS);
		return 2;
	}
	if (ecdsa)
		module_path = path != NULL ? path : "/usr/lib/softhsm/libsofthsm2.so";
	words = mmap(NULL, (size_t)MAX_THREADS * SLOT * sizeof *words, PROT_READ | PROT_WRITE,
		     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (words == MAP_FAILED)
		return 1;
	if (!ecdsa)
		calibrate(us);
	for (enum mode m = DIRECT; m <= FUTEX_PINNED; m++) {
		double ops = run(m, threads);

		if (ops <= 0) {
			fprintf(stderr, "ipc-floor: %s failed\n", mode_name[m]);
			return 1;
		}
		if (m == DIRECT)
			direct = ops;
		if (ecdsa)
			printf("{\"mode\": \"%s\", \"threads\": %d, \"work\": \"ecdsa\", ", mode_name[m],
			       threads);
		else
			printf("{\"mode\": \"%s\", \"threads\": %d, \"work_us\": %.1f, ", mode_name[m],
			       threads, us);
		printf("\"ops_per_s\": %.0f, \"vs_direct\": %.3f}\n", ops, ops / direct);
		fflush(stdout);
	}
	return 0;
}
