/* p11p-faultsim — a PKCS#11 module that wraps a real one and, on rules read from a
 * file, returns chosen CK_RVs, adds latency, hangs, crashes, removes the token, resets
 * sessions, or limits parallelism. The rules file is re-read whenever it changes, so
 * faults come and go while the application runs. See faultsim/README.md.
 *
 * Environment: P11P_FAULTSIM_MODULE (the real module), P11P_FAULTSIM_RULES (the rules
 * file; absent: pure pass-through), P11P_FAULTSIM_LOG (one line per applied fault). */
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "faultsim.h"

CK_FUNCTION_LIST_PTR fs_real;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t slot_free = PTHREAD_COND_INITIALIZER;
static struct fs_rules rules;     /* under lock */
static struct stat rules_stat;    /* the file the rules came from */
static int rules_loaded;
static int in_flight;             /* calls inside the real module (for `concurrency`) */
static const char *rules_path;
static int log_fd = -1;

static const char *const action_names[] = {
	"error", "delay", "hang", "crash", "token-removed", "close-sessions",
};

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0)
		;
}

/* Re-reads the rules file if it changed (inode, size or mtime); counters carry over for
 * rules whose line is unchanged. Called with the lock held. */
static void reload_locked(void)
{
	struct stat st;
	struct fs_rules fresh;
	char *text;
	FILE *f;
	size_t n;

	if (rules_path == NULL)
		return;
	if (stat(rules_path, &st) != 0) {
		if (rules_loaded) {
			fs_rules_free(&rules);
			rules_loaded = 0;
			pthread_cond_broadcast(&slot_free);
		}
		return;
	}
	if (rules_loaded && st.st_ino == rules_stat.st_ino && st.st_size == rules_stat.st_size &&
	    st.st_mtim.tv_sec == rules_stat.st_mtim.tv_sec &&
	    st.st_mtim.tv_nsec == rules_stat.st_mtim.tv_nsec)
		return;
	f = fopen(rules_path, "r");
	if (f == NULL)
		return;
	text = calloc(1, (size_t)st.st_size + 1);
	if (text == NULL) {
		fclose(f);
		return;
	}
	n = fread(text, 1, (size_t)st.st_size, f);
	text[n] = '\0';
	fclose(f);
	fs_rules_parse(rules_path, text, &fresh);
	free(text);
	for (int i = 0; i < fresh.n; i++) {
		for (int j = 0; j < rules.n; j++) {
			if (rules.rule[j].text[0] != '\0' && strcmp(fresh.rule[i].text, rules.rule[j].text) == 0) {
				fresh.rule[i].seen = rules.rule[j].seen;
				fresh.rule[i].applied = rules.rule[j].applied;
				fresh.rule[i].fired = rules.rule[j].fired;
				fresh.rule[i].proc_in = rules.rule[j].proc_in;
				rules.rule[j].text[0] = '\0'; /* each old rule carries over once */
				break;
			}
		}
	}
	fs_rules_free(&rules);
	rules = fresh;
	rules_stat = st;
	rules_loaded = 1;
	pthread_cond_broadcast(&slot_free);
}

static void log_fault(int code, const struct fs_rule *r)
{
	struct timespec now;
	char line[256];
	int len;

	if (log_fd < 0)
		return;
	clock_gettime(CLOCK_REALTIME, &now);
	len = snprintf(line, sizeof line, "%lld.%06ld pid=%d %s %s\n", (long long)now.tv_sec,
		       now.tv_nsec / 1000, (int)getpid(), fs_function_names[code],
		       action_names[r->action]);
	if (len > 0 && write(log_fd, line, (size_t)len) < 0) {
		/* the log is best effort */
	}
}

static int hang_present_locked(const char *text)
{
	for (int i = 0; i < rules.n; i++) {
		if (rules.rule[i].action == FS_HANG && strcmp(rules.rule[i].text, text) == 0)
			return 1;
	}
	return 0;
}

static int token_removed_locked(int code)
{
	for (int i = 0; i < rules.n; i++) {
		const struct fs_rule *r = &rules.rule[i];

		if (r->action == FS_TOKEN_REMOVED && (r->code == 0 || r->code == code))
			return 1;
	}
	return 0;
}

/* Closes every session of the real module on every slot, as an HSM reset does; the
 * module forgets its logins with them. */
static void close_all_sessions(void)
{
	CK_SLOT_ID slots[64];
	CK_ULONG n = 64;

	if (fs_real->C_GetSlotList(CK_FALSE, slots, &n) != CKR_OK)
		return;
	for (CK_ULONG i = 0; i < n; i++)
		fs_real->C_CloseAllSessions(slots[i]);
}

/* procs=N: whether this process is one of the first N processes to meet the rule. They
 * are counted in the file RULES.procs-HASH (HASH of the rule's line), under flock; the
 * decision is taken at the first matching call and kept. Called with the lock held. */
static int counted_process_locked(struct fs_rule *r)
{
	char path[4096], buf[32];
	unsigned long hash = 5381;
	ssize_t got;
	long seen;
	int fd, len;

	if (r->proc_in != 0)
		return r->proc_in > 0;
	r->proc_in = -1;
	for (const char *c = r->text; *c != '\0'; c++)
		hash = hash * 33 + (unsigned char)*c;
	len = snprintf(path, sizeof path, "%s.procs-%08lx", rules_path, hash & 0xffffffffUL);
	if (len < 0 || (size_t)len >= sizeof path)
		return 0;
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0)
		return 0;
	if (flock(fd, LOCK_EX) == 0) {
		got = pread(fd, buf, sizeof buf - 1, 0);
		buf[got > 0 ? got : 0] = '\0';
		seen = strtol(buf, NULL, 10);
		if (seen < r->procs) {
			len = snprintf(buf, sizeof buf, "%ld\n", seen + 1);
			if (pwrite(fd, buf, (size_t)len, 0) == len)
				r->proc_in = 1;
		}
	}
	close(fd); /* releases the flock */
	return r->proc_in > 0;
}

int fs_before(int code, CK_RV *rv)
{
	long delay = 0;
	int crash = 0, close = 0;
	char hang[sizeof rules.rule[0].text] = "";

	pthread_mutex_lock(&lock);
	reload_locked();
	for (int i = 0; i < rules.n; i++) {
		struct fs_rule *r = &rules.rule[i];

		if (r->code != 0 && r->code != code)
			continue;
		if (r->procs > 0 && !counted_process_locked(r))
			continue;
		r->seen++;
		if (r->seen <= r->after)
			continue;
		if (r->every > 0 && (r->seen - r->after) % r->every != 0)
			continue;
		if (r->count > 0 && r->applied >= r->count)
			continue;
		if (r->action == FS_CLOSE_SESSIONS && r->fired)
			continue;
		if (r->action == FS_TOKEN_REMOVED && fs_function_scope[code] == 0)
			continue; /* GetInfo, GetSlotInfo, WaitForSlotEvent... answer as usual */
		r->applied++;
		log_fault(code, r);
		switch (r->action) {
		case FS_ERROR:
			*rv = r->rv;
			pthread_mutex_unlock(&lock);
			return 1;
		case FS_TOKEN_REMOVED:
			*rv = fs_function_scope[code] == 1 ? CKR_TOKEN_NOT_PRESENT : CKR_DEVICE_REMOVED;
			pthread_mutex_unlock(&lock);
			return 1;
		case FS_DELAY:
			delay += r->ms;
			break;
		case FS_HANG:
			memcpy(hang, r->text, sizeof hang);
			break;
		case FS_CRASH:
			crash = 1;
			break;
		case FS_CLOSE_SESSIONS:
			r->fired = 1;
			close = 1;
			break;
		}
	}
	pthread_mutex_unlock(&lock);
	if (crash)
		abort();
	while (hang[0] != '\0') {
		sleep_ms(10);
		pthread_mutex_lock(&lock);
		reload_locked();
		if (!hang_present_locked(hang))
			hang[0] = '\0';
		pthread_mutex_unlock(&lock);
	}
	if (close)
		close_all_sessions();
	/* the slot is taken before the delay: a busy HSM is busy for the delay too */
	pthread_mutex_lock(&lock);
	while (rules.concurrency > 0 && in_flight >= rules.concurrency) {
		struct timespec until;

		clock_gettime(CLOCK_REALTIME, &until);
		until.tv_nsec += 50 * 1000000L;
		if (until.tv_nsec >= 1000000000L) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&slot_free, &lock, &until);
		reload_locked(); /* a removed `concurrency` line frees the waiters */
	}
	in_flight++;
	pthread_mutex_unlock(&lock);
	if (delay > 0)
		sleep_ms(delay);
	return 0;
}

void fs_after(int code)
{
	(void)code;
	pthread_mutex_lock(&lock);
	in_flight--;
	pthread_cond_signal(&slot_free);
	pthread_mutex_unlock(&lock);
}

static CK_RV load_real(void)
{
	const char *path = getenv("P11P_FAULTSIM_MODULE");
	const char *log_path = getenv("P11P_FAULTSIM_LOG");
	CK_C_GetFunctionList get;
	void *handle;

	if (path == NULL || *path == '\0') {
		fprintf(stderr, "p11p-faultsim: P11P_FAULTSIM_MODULE is not set\n");
		return CKR_GENERAL_ERROR;
	}
	handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (handle == NULL) {
		fprintf(stderr, "p11p-faultsim: %s\n", dlerror());
		return CKR_GENERAL_ERROR;
	}
	get = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
	if (get == NULL || get(&fs_real) != CKR_OK || fs_real == NULL) {
		fprintf(stderr, "p11p-faultsim: no usable C_GetFunctionList in %s\n", path);
		fs_real = NULL;
		return CKR_GENERAL_ERROR;
	}
	rules_path = getenv("P11P_FAULTSIM_RULES");
	if (log_path != NULL && *log_path != '\0')
		log_fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	return CKR_OK;
}

CK_RV fs_C_Initialize(CK_VOID_PTR args)
{
	CK_RV rv;

	if (fs_real == NULL && (rv = load_real()) != CKR_OK)
		return rv;
	if (fs_before(1, &rv))
		return rv;
	rv = fs_real->C_Initialize(args);
	fs_after(1);
	return rv;
}

CK_RV fs_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	if (list == NULL)
		return CKR_ARGUMENTS_BAD;
	*list = &fs_function_list;
	return CKR_OK;
}

CK_RV fs_C_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR slots, CK_ULONG_PTR count)
{
	CK_RV rv;
	int removed;

	if (fs_before(5, &rv))
		return rv;
	pthread_mutex_lock(&lock);
	removed = token_removed_locked(5);
	pthread_mutex_unlock(&lock);
	if (removed && present && count != NULL) {
		*count = 0; /* no slot has a token */
		rv = CKR_OK;
	} else {
		rv = fs_real->C_GetSlotList(present, slots, count);
	}
	fs_after(5);
	return rv;
}

CK_RV fs_C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
	CK_RV rv;
	int removed;

	if (fs_before(6, &rv))
		return rv;
	rv = fs_real->C_GetSlotInfo(slot, info);
	fs_after(6);
	pthread_mutex_lock(&lock);
	removed = token_removed_locked(6);
	pthread_mutex_unlock(&lock);
	if (rv == CKR_OK && removed && info != NULL)
		info->flags &= ~(CK_FLAGS)CKF_TOKEN_PRESENT;
	return rv;
}

__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
	return fs_C_GetFunctionList(list);
}
