/* p11bench — command-line options. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>

#include "ops.h"
#include "options.h"

static void usage(const char *prog)
{
	fprintf(stderr,
		"usage: %s --module PATH --token LABEL [--pin PIN] [--setup]\n"
		"          [--op NAME --threads N --seconds S [--warmup S] [--timeline]]\n"
		"          [--hold SESSIONS]\n"
		"Prints one JSON line. Operations: %s.\n"
		"--setup makes the keys that are missing (bench-aes, bench-ec, bench-rsa).\n"
		"--hold opens SESSIONS sessions (each used once), prints a line, and keeps them\n"
		"until stdin closes.\n",
		prog, bench_op_names());
}

static int positive(const char *text, double *out)
{
	char *end;
	double v = strtod(text, &end);
	if (*text == '\0' || *end != '\0' || !(v >= 0))
		return -1;
	*out = v;
	return 0;
}

int bench_parse_options(int argc, char **argv, bench_options *o)
{
	static const struct option longs[] = {
		{ "module", required_argument, NULL, 'm' }, { "token", required_argument, NULL, 't' },
		{ "pin", required_argument, NULL, 'p' },    { "op", required_argument, NULL, 'o' },
		{ "threads", required_argument, NULL, 'n' }, { "seconds", required_argument, NULL, 's' },
		{ "warmup", required_argument, NULL, 'w' },  { "setup", no_argument, NULL, 'S' },
		{ "timeline", no_argument, NULL, 'T' },      { "hold", required_argument, NULL, 'H' },
		{ "help", no_argument, NULL, 'h' },          { NULL, 0, NULL, 0 },
	};
	*o = (bench_options){ .pin = "1234", .threads = 1, .seconds = 5.0 };
	double v;
	int c;
	while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
		switch (c) {
		case 'm': o->module = optarg; break;
		case 't': o->token = optarg; break;
		case 'p': o->pin = optarg; break;
		case 'o': o->op = optarg; break;
		case 'S': o->setup = 1; break;
		case 'T': o->timeline = 1; break;
		case 'n':
		case 'H':
			if (positive(optarg, &v) != 0 || v < 1 || v > 100000 || v != (int)v)
				goto bad;
			*(c == 'n' ? &o->threads : &o->hold) = (int)v;
			break;
		case 's':
		case 'w':
			if (positive(optarg, &v) != 0 || v > 86400)
				goto bad;
			*(c == 's' ? &o->seconds : &o->warmup) = v;
			break;
		default:
			goto bad;
		}
	}
	if (optind != argc || o->module == NULL || o->token == NULL)
		goto bad;
	if (o->op == NULL && !o->setup && o->hold == 0)
		goto bad;
	if (o->op != NULL && bench_op_find(o->op) == NULL) {
		fprintf(stderr, "%s: unknown operation: %s\n", argv[0], o->op);
		goto bad;
	}
	return 0;
bad:
	usage(argv[0]);
	return -1;
}
