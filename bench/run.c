/* p11bench — a timed run: N threads, each with its own session, repeat one operation. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "run.h"

typedef struct shared {
	pthread_mutex_t lock;
	pthread_cond_t changed;
	int ready; /* threads that have their session */
	int go;    /* set once the times below are */
	double measure_from, deadline; /* monotonic seconds */
} shared;

typedef struct worker {
	pthread_t thread;
	const bench_run_spec *spec;
	shared *sh;
	bench_ctx ctx;
	bench_recorder rec;
	double last_end;
} worker;

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *work(void *arg)
{
	worker *w = arg;
	const bench_run_spec *spec = w->spec;
	CK_RV rv = spec->f->C_OpenSession(spec->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL,
					  NULL, &w->ctx.session);
	pthread_mutex_lock(&w->sh->lock);
	w->sh->ready++;
	pthread_cond_broadcast(&w->sh->changed);
	while (!w->sh->go)
		pthread_cond_wait(&w->sh->changed, &w->sh->lock);
	pthread_mutex_unlock(&w->sh->lock);
	if (rv != CKR_OK) {
		bench_record(&w->rec, 0, 0, rv, "C_OpenSession");
		return NULL;
	}
	for (;;) {
		uint64_t start = now_ns();
		double started = (double)start / 1e9;
		if (started >= w->sh->deadline)
			break;
		const char *what = NULL;
		rv = spec->op->run(&w->ctx, &what);
		uint64_t end = now_ns();
		w->last_end = (double)end / 1e9;
		if (started >= w->sh->measure_from)
			bench_record(&w->rec, w->last_end - w->sh->measure_from, end - start, rv, what);
		if (rv != CKR_OK)
			bench_ctx_reopen(&w->ctx);
	}
	if (w->ctx.session != CK_INVALID_HANDLE) {
		rv = spec->f->C_CloseSession(w->ctx.session);
		if (rv != CKR_OK)
			bench_count_error(&w->rec, rv, "C_CloseSession");
	}
	return NULL;
}

int bench_run(const bench_run_spec *spec, bench_run_result *result)
{
	size_t seconds = (size_t)spec->seconds + 2;
	int n = spec->threads, started = 0, failed = 0;
	worker *workers = calloc((size_t)n, sizeof(*workers));
	shared sh = { .lock = PTHREAD_MUTEX_INITIALIZER, .changed = PTHREAD_COND_INITIALIZER };
	memset(result, 0, sizeof(*result));
	if (workers == NULL || bench_recorder_init(&result->all, seconds) != 0) {
		free(workers);
		return -1;
	}
	for (int i = 0; i < n && !failed; i++) {
		worker *w = &workers[i];
		w->spec = spec;
		w->sh = &sh;
		w->ctx = (bench_ctx){ .f = spec->f, .slot = spec->slot, .keys = spec->keys,
				      .fixture = spec->fixture };
		for (size_t b = 0; b < sizeof(w->ctx.input); b++)
			w->ctx.input[b] = (unsigned char)(b * 7 + (size_t)i);
		if (bench_recorder_init(&w->rec, seconds) != 0 ||
		    pthread_create(&w->thread, NULL, work, w) != 0)
			failed = 1;
		else
			started++;
	}
	pthread_mutex_lock(&sh.lock);
	while (sh.ready < started)
		pthread_cond_wait(&sh.changed, &sh.lock);
	/* when a thread could not start, the others stop at once: the run does not count */
	sh.measure_from = now_s() + (failed ? 0 : spec->warmup);
	sh.deadline = failed ? 0 : sh.measure_from + spec->seconds;
	sh.go = 1;
	pthread_cond_broadcast(&sh.changed);
	pthread_mutex_unlock(&sh.lock);
	if (!failed && spec->on_measure != NULL) {
		double wait = sh.measure_from - now_s();
		if (wait > 0) {
			struct timespec ts = { (time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9) };
			nanosleep(&ts, NULL);
		}
		spec->on_measure();
	}
	for (int i = 0; i < started; i++) {
		pthread_join(workers[i].thread, NULL);
		if (bench_recorder_merge(&result->all, &workers[i].rec) != 0)
			failed = 1;
		if (workers[i].last_end - sh.measure_from > result->window_s)
			result->window_s = workers[i].last_end - sh.measure_from;
	}
	for (int i = 0; i < n; i++)
		bench_recorder_free(&workers[i].rec);
	free(workers);
	return failed ? -1 : 0;
}
