/* p11bench — what a run measured: latencies of every timed call, errors by kind, and a
 * per-second timeline. One recorder per thread (no locking), merged at the end. */
#ifndef P11BENCH_STATS_H
#define P11BENCH_STATS_H

#include <stddef.h>
#include <stdint.h>

#include "cryptoki.h"

#define BENCH_ERROR_KINDS 8

typedef struct bench_error_kind {
	const char *what; /* the failing function (a static string) */
	CK_RV rv;
	unsigned long count;
} bench_error_kind;

typedef struct bench_second {
	unsigned long ops, errors;
	uint64_t max_ns;
} bench_second;

typedef struct bench_recorder {
	uint64_t *latency_ns; /* every timed operation, successful or not */
	size_t n, cap;
	unsigned long ops, errors;
	bench_error_kind kinds[BENCH_ERROR_KINDS];
	size_t nkinds;
	unsigned long other_kinds; /* errors past the first BENCH_ERROR_KINDS kinds */
	bench_second *timeline;
	size_t seconds;
	int out_of_memory;
} bench_recorder;

typedef struct bench_summary {
	double p50_us, p99_us, max_us, mean_us;
} bench_summary;

/* A recorder with a timeline of `seconds` one-second slots (later ones go to the last). */
int bench_recorder_init(bench_recorder *r, size_t seconds);
void bench_recorder_free(bench_recorder *r);

/* One timed operation that ended `at_s` seconds into the run and took `ns`. */
void bench_record(bench_recorder *r, double at_s, uint64_t ns, CK_RV rv, const char *what);

/* A failed call outside the timed operations (closing the session at the end). */
void bench_count_error(bench_recorder *r, CK_RV rv, const char *what);

/* Adds everything `from` holds to `into`. */
int bench_recorder_merge(bench_recorder *into, const bench_recorder *from);

/* Percentiles over all recorded operations (sorts the latencies in place). */
void bench_summarize(bench_recorder *r, bench_summary *s);

#endif
