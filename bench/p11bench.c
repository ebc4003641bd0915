/* p11bench — PKCS#11 benchmark client: loads a module, finds a token by label, logs in,
 * and times one operation over N threads with a session each; prints one JSON line.
 * See bench/README.md. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "keys.h"
#include "options.h"
#include "report.h"
#include "run.h"

/* A call that failed after the JSON line was printed: stderr, and exit status 3. */
static void report_late(const char *what, CK_RV rv)
{
	char buf[32];
	fprintf(stderr, "p11bench: %s: %s\n", what, bench_rv_name(rv, buf, sizeof(buf)));
}

/* --hold: N sessions in all (the logged-in main one and N-1 more), each used once for
 * C_GenerateRandom so that it is live at the token, kept until stdin reaches EOF. */
static int hold_sessions(const bench_options *o, CK_FUNCTION_LIST_PTR f, CK_SLOT_ID slot,
			 CK_SESSION_HANDLE main_session, unsigned created)
{
	CK_SESSION_HANDLE *s = calloc((size_t)o->hold, sizeof(*s));
	if (s == NULL) {
		bench_report_failure(stdout, o, "out of memory", CKR_HOST_MEMORY);
		return 1;
	}
	s[0] = main_session;
	int opened = 1, status = 0;
	for (int i = 0; i < o->hold && status == 0; i++) {
		CK_RV rv = CKR_OK;
		const char *what = "C_OpenSession";
		if (i > 0) {
			rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
					      &s[i]);
			opened += rv == CKR_OK;
		}
		if (rv == CKR_OK) {
			unsigned char random[16];
			what = "C_GenerateRandom";
			rv = f->C_GenerateRandom(s[i], random, sizeof(random));
		}
		if (rv != CKR_OK) {
			bench_report_failure(stdout, o, what, rv);
			status = 1;
		}
	}
	if (status == 0) {
		char fields[64];
		snprintf(fields, sizeof(fields), "\"hold\":%d,\"pid\":%ld", opened, (long)getpid());
		bench_report_status(stdout, o, created, fields);
		char buf[256];
		while (read(STDIN_FILENO, buf, sizeof(buf)) > 0)
			;
	}
	for (int i = 1; i < opened; i++) {
		CK_RV rv = f->C_CloseSession(s[i]);
		if (rv != CKR_OK && status == 0) {
			report_late("C_CloseSession", rv);
			status = 3;
		}
	}
	free(s);
	return status;
}

/* With --timeline, stderr says when the measured time begins, so that a driver can
 * place events (a member failing) on the timeline. */
static void say_measuring(void)
{
	fputs("p11bench: measuring\n", stderr);
	fflush(stderr);
}

static int timed_run(const bench_options *o, CK_FUNCTION_LIST_PTR f, CK_SLOT_ID slot,
		     CK_SESSION_HANDLE main_session, const bench_op *op, const bench_keys *keys)
{
	bench_fixture fixture = { 0 };
	const char *what = NULL;
	CK_RV rv = op->prepare ? op->prepare(f, main_session, keys, &fixture, &what) : CKR_OK;
	if (rv != CKR_OK) {
		bench_report_failure(stdout, o, what, rv);
		return 1;
	}
	bench_run_spec spec = { .f = f, .slot = slot, .keys = keys, .fixture = &fixture, .op = op,
				.threads = o->threads, .seconds = o->seconds,
				.warmup = o->warmup,
				.on_measure = o->timeline ? say_measuring : NULL };
	bench_run_result result;
	if (bench_run(&spec, &result) != 0) {
		bench_recorder_free(&result.all);
		bench_report_failure(stdout, o, "could not run the threads", CKR_HOST_MEMORY);
		return 1;
	}
	bench_report_run(stdout, o, &result, keys->created);
	int ok = result.all.errors == 0 && result.all.ops > 0;
	bench_recorder_free(&result.all);
	return ok ? 0 : 3;
}

int main(int argc, char **argv)
{
	bench_options o;
	if (bench_parse_options(argc, argv, &o) != 0)
		return 2;
	const bench_op *op = o.op ? bench_op_find(o.op) : NULL;
	const char *what = NULL;
	bench_module m;
	CK_RV rv = bench_module_load(o.module, &m, &what);
	if (rv != CKR_OK) {
		bench_report_failure(stdout, &o, what, rv);
		return 1;
	}
	int status = 1;
	CK_SLOT_ID slot;
	CK_SESSION_HANDLE main_session;
	bench_keys keys = { 0 };
	rv = bench_find_slot(m.f, o.token, &slot, &what);
	if (rv == CKR_OK)
		rv = bench_open_logged_in(m.f, slot, o.pin, &main_session, &what);
	if (rv != CKR_OK) {
		bench_report_failure(stdout, &o, what, rv);
		goto out;
	}
	/* the main session stays open (and logged in) while the threads run */
	unsigned need = (o.setup ? BENCH_KEY_ALL : 0) | (op ? op->keys : 0);
	rv = bench_keys_get(m.f, main_session, need, o.setup, &keys, &what);
	if (rv != CKR_OK) {
		bench_report_failure(stdout, &o, what, rv);
	} else if (o.hold > 0) {
		status = hold_sessions(&o, m.f, slot, main_session, keys.created);
	} else if (op != NULL) {
		status = timed_run(&o, m.f, slot, main_session, op, &keys);
	} else {
		bench_report_status(stdout, &o, keys.created, "\"setup\":true");
		status = 0;
	}
	rv = m.f->C_CloseSession(main_session);
	if (rv != CKR_OK) {
		report_late("C_CloseSession", rv);
		status = status ? status : 3;
	}
out:
	rv = bench_module_unload(&m);
	if (rv != CKR_OK) {
		report_late("C_Finalize", rv);
		status = status ? status : 3;
	}
	return status;
}
