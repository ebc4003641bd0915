/* p11bench — a timed run: N threads, each with its own session, repeat one operation. */
#ifndef P11BENCH_RUN_H
#define P11BENCH_RUN_H

#include "ops.h"
#include "stats.h"

typedef struct bench_run_spec {
	CK_FUNCTION_LIST_PTR f;
	CK_SLOT_ID slot;
	const bench_keys *keys;
	const bench_fixture *fixture; /* what op->prepare made */
	const bench_op *op;
	int threads;
	double seconds; /* measured time */
	double warmup;  /* untimed time before it */
	void (*on_measure)(void); /* when set: called as the measured time begins */
} bench_run_spec;

typedef struct bench_run_result {
	bench_recorder all; /* every thread's recorder merged */
	double window_s;    /* from the end of the warm-up to the last operation's end */
} bench_run_result;

/* Runs the threads and merges what they measured. -1 only when the run itself could not
 * happen (no memory, no threads); failing PKCS#11 calls are counted in the result. */
int bench_run(const bench_run_spec *spec, bench_run_result *result);

#endif
