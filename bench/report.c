/* p11bench — the one JSON line a run prints. */
#include "keys.h"
#include "report.h"

static void json_string(FILE *out, const char *s)
{
	fputc('"', out);
	for (; s != NULL && *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			fprintf(out, "\\%c", c);
		else if (c < 0x20)
			fprintf(out, "\\u%04x", c);
		else
			fputc(c, out);
	}
	fputc('"', out);
}

static void head(FILE *out, const bench_options *o)
{
	fputs("{\"module\":", out);
	json_string(out, o->module);
	fputs(",\"token\":", out);
	json_string(out, o->token);
}

void bench_report_created(FILE *out, unsigned created)
{
	const char *sep = "";
	const struct { unsigned bit; const char *label; } keys[] = {
		{ BENCH_KEY_AES, BENCH_LABEL_AES },
		{ BENCH_KEY_EC, BENCH_LABEL_EC },
		{ BENCH_KEY_RSA, BENCH_LABEL_RSA },
	};
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		if (created & keys[i].bit) {
			fprintf(out, "%s\"%s\"", sep, keys[i].label);
			sep = ",";
		}
	}
}

void bench_report_run(FILE *out, const bench_options *o, bench_run_result *r, unsigned created)
{
	bench_summary s;
	bench_summarize(&r->all, &s);
	double window = r->window_s > 0 ? r->window_s : o->seconds;
	head(out, o);
	fputs(",\"op\":", out);
	json_string(out, o->op);
	fprintf(out, ",\"threads\":%d,\"seconds\":%.3f,\"ops\":%lu,\"ops_per_s\":%.1f,"
		"\"p50_us\":%.1f,\"p99_us\":%.1f,\"max_us\":%.1f,\"mean_us\":%.1f,\"errors\":%lu",
		o->threads, window, r->all.ops, window > 0 ? (double)r->all.ops / window : 0.0,
		s.p50_us, s.p99_us, s.max_us, s.mean_us, r->all.errors);
	fputs(",\"error_kinds\":[", out);
	for (size_t i = 0; i < r->all.nkinds; i++) {
		char buf[32];
		fputs(i ? ",{\"call\":" : "{\"call\":", out);
		json_string(out, r->all.kinds[i].what);
		fprintf(out, ",\"rv\":\"%s\",\"count\":%lu}",
			bench_rv_name(r->all.kinds[i].rv, buf, sizeof(buf)), r->all.kinds[i].count);
	}
	if (r->all.other_kinds)
		fprintf(out, "%s{\"call\":\"other\",\"rv\":\"other\",\"count\":%lu}",
			r->all.nkinds ? "," : "", r->all.other_kinds);
	fputs("],\"keys_created\":[", out);
	bench_report_created(out, created);
	fputc(']', out);
	if (o->timeline) {
		/* one [ops, errors, max_us] per second of the measured window */
		size_t last = (size_t)window + 1;
		fputs(",\"timeline\":[", out);
		for (size_t i = 0; i < r->all.seconds && i < last; i++) {
			const bench_second *t = &r->all.timeline[i];
			fprintf(out, "%s[%lu,%lu,%.1f]", i ? "," : "", t->ops, t->errors,
				(double)t->max_ns / 1000.0);
		}
		fputc(']', out);
	}
	int ok = r->all.errors == 0 && r->all.ops > 0 && !r->all.out_of_memory;
	fprintf(out, ",\"ok\":%s}\n", ok ? "true" : "false");
	fflush(out);
}

void bench_report_status(FILE *out, const bench_options *o, unsigned created, const char *fields)
{
	head(out, o);
	fputs(",\"keys_created\":[", out);
	bench_report_created(out, created);
	fprintf(out, "]%s%s,\"ok\":true}\n", fields && *fields ? "," : "", fields ? fields : "");
	fflush(out);
}

void bench_report_failure(FILE *out, const bench_options *o, const char *what, CK_RV rv)
{
	char buf[32];
	head(out, o);
	if (o->op != NULL) {
		fputs(",\"op\":", out);
		json_string(out, o->op);
		fprintf(out, ",\"threads\":%d", o->threads);
	}
	fputs(",\"error\":", out);
	json_string(out, what);
	fprintf(out, ",\"rv\":\"%s\",\"ok\":false}\n", bench_rv_name(rv, buf, sizeof(buf)));
	fflush(out);
}
