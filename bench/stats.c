/* p11bench — what a run measured: latencies, errors by kind, a per-second timeline. */
#include <stdlib.h>
#include <string.h>

#include "stats.h"

int bench_recorder_init(bench_recorder *r, size_t seconds)
{
	memset(r, 0, sizeof(*r));
	r->seconds = seconds > 0 ? seconds : 1;
	r->timeline = calloc(r->seconds, sizeof(*r->timeline));
	r->cap = 4096;
	r->latency_ns = malloc(r->cap * sizeof(*r->latency_ns));
	if (r->timeline == NULL || r->latency_ns == NULL) {
		bench_recorder_free(r);
		return -1;
	}
	return 0;
}

void bench_recorder_free(bench_recorder *r)
{
	free(r->latency_ns);
	free(r->timeline);
	r->latency_ns = NULL;
	r->timeline = NULL;
	r->n = r->cap = 0;
}

static int reserve(bench_recorder *r, size_t more)
{
	if (r->n + more <= r->cap)
		return 0;
	size_t cap = r->cap ? r->cap : 4096;
	while (cap < r->n + more)
		cap *= 2;
	uint64_t *grown = realloc(r->latency_ns, cap * sizeof(*grown));
	if (grown == NULL) {
		r->out_of_memory = 1;
		return -1;
	}
	r->latency_ns = grown;
	r->cap = cap;
	return 0;
}

static void count_error(bench_recorder *r, const char *what, CK_RV rv, unsigned long count)
{
	for (size_t i = 0; i < r->nkinds; i++) {
		if (r->kinds[i].rv == rv && strcmp(r->kinds[i].what, what) == 0) {
			r->kinds[i].count += count;
			return;
		}
	}
	if (r->nkinds == BENCH_ERROR_KINDS) {
		r->other_kinds += count;
		return;
	}
	r->kinds[r->nkinds++] = (bench_error_kind){ what, rv, count };
}

void bench_record(bench_recorder *r, double at_s, uint64_t ns, CK_RV rv, const char *what)
{
	if (reserve(r, 1) == 0)
		r->latency_ns[r->n++] = ns;
	size_t sec = at_s < 0 ? 0 : (size_t)at_s;
	if (sec >= r->seconds)
		sec = r->seconds - 1;
	bench_second *slot = &r->timeline[sec];
	if (ns > slot->max_ns)
		slot->max_ns = ns;
	if (rv == CKR_OK) {
		r->ops++;
		slot->ops++;
	} else {
		r->errors++;
		slot->errors++;
		count_error(r, what ? what : "?", rv, 1);
	}
}

void bench_count_error(bench_recorder *r, CK_RV rv, const char *what)
{
	r->errors++;
	count_error(r, what, rv, 1);
}

int bench_recorder_merge(bench_recorder *into, const bench_recorder *from)
{
	if (reserve(into, from->n) != 0)
		return -1;
	memcpy(into->latency_ns + into->n, from->latency_ns, from->n * sizeof(*from->latency_ns));
	into->n += from->n;
	into->ops += from->ops;
	into->errors += from->errors;
	into->other_kinds += from->other_kinds;
	into->out_of_memory |= from->out_of_memory;
	for (size_t i = 0; i < from->nkinds; i++)
		count_error(into, from->kinds[i].what, from->kinds[i].rv, from->kinds[i].count);
	for (size_t i = 0; i < from->seconds && i < into->seconds; i++) {
		into->timeline[i].ops += from->timeline[i].ops;
		into->timeline[i].errors += from->timeline[i].errors;
		if (from->timeline[i].max_ns > into->timeline[i].max_ns)
			into->timeline[i].max_ns = from->timeline[i].max_ns;
	}
	return 0;
}

static int by_value(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* The value below which `q` of the sorted samples lie (nearest rank). */
static double quantile_us(const uint64_t *sorted, size_t n, double q)
{
	size_t rank = (size_t)(q * (double)n + 0.999999);
	if (rank == 0)
		rank = 1;
	if (rank > n)
		rank = n;
	return (double)sorted[rank - 1] / 1000.0;
}

void bench_summarize(bench_recorder *r, bench_summary *s)
{
	memset(s, 0, sizeof(*s));
	if (r->n == 0)
		return;
	qsort(r->latency_ns, r->n, sizeof(*r->latency_ns), by_value);
	double sum = 0;
	for (size_t i = 0; i < r->n; i++)
		sum += (double)r->latency_ns[i];
	s->mean_us = sum / (double)r->n / 1000.0;
	s->p50_us = quantile_us(r->latency_ns, r->n, 0.50);
	s->p99_us = quantile_us(r->latency_ns, r->n, 0.99);
	s->max_us = (double)r->latency_ns[r->n - 1] / 1000.0;
}
