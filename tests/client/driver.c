/* p11p client tests — a small C application for the transport tests: loads the client
 * library (argv[1]) with dlopen, reads one command per line on stdin and prints one
 * result line per command ("key=value ..."), so a pytest test can script it step by step
 * against a fake daemon. Built plain and with -fsanitize=address,undefined.
 *
 *   init | init-args none|os|callbacks|callbacks-os|partial|reserved | finalize
 *   finalize-reserved | info | status | locks | slots | sign CAP | threads N
 *   wait-bg | wait-join | wait-nb | sleep MS | fork CMD;CMD;... | clone CMD;... | pid | quit
 *
 * "fork" runs its commands in a child (their lines start with "child "), waits for it,
 * then prints "forked status=N". */
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST_PTR f;
static const char *prefix = "";

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

/* ---- application mutex callbacks, counted ---- */

static atomic_int creates, destroys, locks, unlocks;

static CK_RV app_create(CK_VOID_PTR_PTR m)
{
	pthread_mutex_t *mu = malloc(sizeof *mu);

	pthread_mutex_init(mu, NULL);
	*m = mu;
	creates++;
	return CKR_OK;
}

static CK_RV app_destroy(CK_VOID_PTR m)
{
	pthread_mutex_destroy(m);
	free(m);
	destroys++;
	return CKR_OK;
}

static CK_RV app_lock(CK_VOID_PTR m)
{
	locks++;
	return pthread_mutex_lock(m) == 0 ? CKR_OK : CKR_GENERAL_ERROR;
}

static CK_RV app_unlock(CK_VOID_PTR m)
{
	unlocks++;
	return pthread_mutex_unlock(m) == 0 ? CKR_OK : CKR_GENERAL_ERROR;
}

static CK_RV init_args(const char *which)
{
	CK_C_INITIALIZE_ARGS a;
	int reserved = 0;

	memset(&a, 0, sizeof a);
	if (strcmp(which, "os") == 0) {
		a.flags = CKF_OS_LOCKING_OK;
	} else if (strncmp(which, "callbacks", 9) == 0) {
		a.CreateMutex = app_create;
		a.DestroyMutex = app_destroy;
		a.LockMutex = app_lock;
		a.UnlockMutex = app_unlock;
		if (strcmp(which, "callbacks-os") == 0)
			a.flags = CKF_OS_LOCKING_OK;
	} else if (strcmp(which, "partial") == 0) {
		a.CreateMutex = app_create;
		a.DestroyMutex = app_destroy;
	} else if (strcmp(which, "reserved") == 0) {
		a.pReserved = &reserved;
	}
	return f->C_Initialize(&a);
}

/* ---- calls ---- */

struct slots_result {
	CK_RV rv;
	CK_ULONG count;
	double ms;
};

static struct slots_result slots(void)
{
	struct slots_result r;
	double t0 = now_ms();

	r.count = 0;
	r.rv = f->C_GetSlotList(CK_TRUE, NULL, &r.count);
	r.ms = now_ms() - t0;
	return r;
}

static pthread_barrier_t barrier;

static void *slots_thread(void *arg)
{
	pthread_barrier_wait(&barrier);
	*(struct slots_result *)arg = slots();
	return NULL;
}

static void threads(int n)
{
	pthread_t th[64];
	struct slots_result r[64];
	char rvs[1024] = "", counts[1024] = "";
	double t0;

	if (n > 64)
		n = 64;
	pthread_barrier_init(&barrier, NULL, (unsigned)n + 1);
	for (int i = 0; i < n; i++)
		pthread_create(&th[i], NULL, slots_thread, &r[i]);
	pthread_barrier_wait(&barrier);
	t0 = now_ms();
	for (int i = 0; i < n; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < n; i++) {
		snprintf(rvs + strlen(rvs), sizeof rvs - strlen(rvs), "%s0x%lx", i ? "," : "", r[i].rv);
		snprintf(counts + strlen(counts), sizeof counts - strlen(counts), "%s%lu", i ? "," : "",
			 r[i].count);
	}
	pthread_barrier_destroy(&barrier);
	printf("%srvs=%s counts=%s ms=%.0f\n", prefix, rvs, counts, now_ms() - t0);
}

static pthread_t waiter;
static CK_RV wait_rv;
static double wait_start, wait_end;

static void *wait_thread(void *arg)
{
	CK_SLOT_ID slot = 0;

	(void)arg;
	wait_rv = f->C_WaitForSlotEvent(0, &slot, NULL);
	wait_end = now_ms();
	return NULL;
}

static void run(char *line);

/* fork(), or with `raw` a clone() that runs no fork handlers (the library's second guard) */
static void do_fork(char *cmds, int raw)
{
	pid_t pid;
	int status = 0;

	fflush(stdout);
	pid = raw ? (pid_t)syscall(SYS_clone, SIGCHLD, NULL, NULL, NULL, NULL) : fork();
	if (pid == 0) {
		prefix = "child ";
		for (char *save = NULL, *c = strtok_r(cmds, ";", &save); c; c = strtok_r(NULL, ";", &save))
			run(c);
		fflush(stdout);
		_exit(0);
	}
	waitpid(pid, &status, 0);
	printf("forked status=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
}

static void run(char *line)
{
	char *arg = strchr(line, ' ');
	CK_RV rv;

	line[strcspn(line, "\n")] = '\0';
	if (arg)
		*arg++ = '\0';
	if (strcmp(line, "init") == 0) {
		printf("%srv=0x%lx\n", prefix, f->C_Initialize(NULL));
	} else if (strcmp(line, "init-args") == 0) {
		printf("%srv=0x%lx\n", prefix, init_args(arg ? arg : "none"));
	} else if (strcmp(line, "finalize") == 0) {
		double t0 = now_ms();

		rv = f->C_Finalize(NULL);
		printf("%srv=0x%lx ms=%.0f\n", prefix, rv, now_ms() - t0);
	} else if (strcmp(line, "finalize-reserved") == 0) {
		printf("%srv=0x%lx\n", prefix, f->C_Finalize(&rv));
	} else if (strcmp(line, "info") == 0) {
		CK_INFO info;

		memset(&info, 0, sizeof info);
		rv = f->C_GetInfo(&info);
		printf("%srv=0x%lx version=%d.%d manufacturer=%.32s| description=%.32s|\n", prefix, rv,
		       info.cryptokiVersion.major, info.cryptokiVersion.minor,
		       (char *)info.manufacturerID, (char *)info.libraryDescription);
	} else if (strcmp(line, "status") == 0) {
		printf("%srv=0x%lx cancel=0x%lx\n", prefix, f->C_GetFunctionStatus(1),
		       f->C_CancelFunction(1));
	} else if (strcmp(line, "locks") == 0) {
		printf("%screates=%d destroys=%d locks=%d unlocks=%d\n", prefix, creates, destroys, locks,
		       unlocks);
	} else if (strcmp(line, "slots") == 0) {
		struct slots_result r = slots();

		printf("%srv=0x%lx count=%lu ms=%.0f\n", prefix, r.rv, r.count, r.ms);
	} else if (strcmp(line, "sign") == 0) {
		CK_BYTE out[64];
		CK_ULONG len = arg ? strtoul(arg, NULL, 10) : sizeof out;

		rv = f->C_Sign(1, (CK_BYTE_PTR) "data", 4, out, &len);
		printf("%srv=0x%lx len=%lu\n", prefix, rv, len);
	} else if (strcmp(line, "open") == 0) {
		CK_SESSION_HANDLE h = 0;

		rv = f->C_OpenSession(arg ? strtoul(arg, NULL, 10) : 0,
				      CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &h);
		printf("%srv=0x%lx session=%lu\n", prefix, rv, h);
	} else if (strcmp(line, "login") == 0 || strcmp(line, "login-so") == 0 ||
		   strcmp(line, "login-context") == 0) { /* login H PIN */
		char *pin = arg ? strchr(arg, ' ') : NULL;
		CK_USER_TYPE user = line[5] == '\0' ? CKU_USER
				    : line[6] == 's' ? CKU_SO : CKU_CONTEXT_SPECIFIC;

		if (pin)
			*pin++ = '\0';
		rv = f->C_Login(arg ? strtoul(arg, NULL, 10) : 0, user, (CK_UTF8CHAR_PTR)pin,
				pin ? strlen(pin) : 0);
		printf("%srv=0x%lx\n", prefix, rv);
	} else if (strcmp(line, "setpin") == 0) { /* setpin H OLD NEW */
		char *old = arg ? strchr(arg, ' ') : NULL, *pin = old ? strchr(old + 1, ' ') : NULL;

		if (pin) {
			*old++ = '\0';
			*pin++ = '\0';
			rv = f->C_SetPIN(strtoul(arg, NULL, 10), (CK_UTF8CHAR_PTR)old, strlen(old),
					 (CK_UTF8CHAR_PTR)pin, strlen(pin));
		} else {
			rv = CKR_ARGUMENTS_BAD;
		}
		printf("%srv=0x%lx\n", prefix, rv);
	} else if (strcmp(line, "logout") == 0) {
		printf("%srv=0x%lx\n", prefix, f->C_Logout(arg ? strtoul(arg, NULL, 10) : 0));
	} else if (strcmp(line, "close") == 0) {
		printf("%srv=0x%lx\n", prefix, f->C_CloseSession(arg ? strtoul(arg, NULL, 10) : 0));
	} else if (strcmp(line, "threads") == 0) {
		threads(arg ? atoi(arg) : 8);
	} else if (strcmp(line, "wait-bg") == 0) {
		wait_start = now_ms();
		pthread_create(&waiter, NULL, wait_thread, NULL);
		printf("%sstarted\n", prefix);
	} else if (strcmp(line, "wait-join") == 0) {
		pthread_join(waiter, NULL);
		printf("%srv=0x%lx ms=%.0f ago=%.0f\n", prefix, wait_rv, wait_end - wait_start,
		       now_ms() - wait_end);
	} else if (strcmp(line, "wait-nb") == 0) {
		CK_SLOT_ID slot = 0;

		rv = f->C_WaitForSlotEvent(CKF_DONT_BLOCK, &slot, NULL);
		printf("%srv=0x%lx slot=%lu\n", prefix, rv, slot);
	} else if (strcmp(line, "sleep") == 0) {
		struct timespec ts = { 0, 0 };
		long ms = arg ? atol(arg) : 0;

		ts.tv_sec = ms / 1000;
		ts.tv_nsec = (ms % 1000) * 1000000L;
		nanosleep(&ts, NULL);
		printf("%sok\n", prefix);
	} else if (strcmp(line, "fork") == 0 || strcmp(line, "clone") == 0) {
		do_fork(arg ? arg : (char *)"", line[0] == 'c');
	} else if (strcmp(line, "pid") == 0) {
		printf("%spid=%ld\n", prefix, (long)getpid());
	} else {
		printf("%serror=unknown-command\n", prefix);
	}
	fflush(stdout);
}

int main(int argc, char **argv)
{
	char line[4096];
	void *lib;
	CK_C_GetFunctionList get;

	if (argc != 2) {
		fprintf(stderr, "usage: driver LIBRARY < commands\n");
		return 2;
	}
	lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
	if (lib == NULL) {
		fprintf(stderr, "dlopen: %s\n", dlerror());
		return 2;
	}
	*(void **)&get = dlsym(lib, "C_GetFunctionList");
	if (get == NULL || get(&f) != CKR_OK) {
		fprintf(stderr, "no C_GetFunctionList\n");
		return 2;
	}
	printf("ready pid=%ld\n", (long)getpid());
	fflush(stdout);
	while (fgets(line, sizeof line, stdin) != NULL) {
		if (strncmp(line, "quit", 4) == 0)
			break;
		run(line);
	}
	return 0;
}
