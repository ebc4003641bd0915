/* p11bench — command-line options. */
#ifndef P11BENCH_OPTIONS_H
#define P11BENCH_OPTIONS_H

typedef struct bench_options {
	const char *module;
	const char *token;
	const char *pin;
	const char *op; /* NULL: no timed run (--setup or --hold alone) */
	int threads;
	double seconds;
	double warmup;
	int setup;     /* generate the keys that are missing */
	int timeline;  /* add the per-second timeline to the JSON line */
	int hold;      /* > 0: open this many sessions, say so, wait for EOF on stdin */
} bench_options;

/* Fills `o` from argv. Returns 0, or -1 after printing usage to stderr. */
int bench_parse_options(int argc, char **argv, bench_options *o);

#endif
