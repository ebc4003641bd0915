/* p11p-faultsim — the rules file: one rule a line, `#` starts a comment.
 *
 *   FUNCTION|*  error rv=NAME|NUMBER | delay ms=N | hang | crash | token-removed
 *               | close-sessions   [after=N] [count=N] [every=N] [procs=N]
 *   concurrency N
 *
 * A malformed line is reported on stderr with its line number and skipped. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "faultsim.h"

static void complain(const char *path, int line, const char *what, const char *word)
{
	fprintf(stderr, "p11p-faultsim: %s:%d: %s%s%s (line ignored)\n", path, line, what,
		word ? ": " : "", word ? word : "");
}

static int number(const char *text, long *out)
{
	char *end;

	errno = 0;
	*out = strtol(text, &end, 0);
	return errno != 0 || end == text || *end != '\0' || *out < 0 ? -1 : 0;
}

static int parse_rv(const char *text, CK_RV *out)
{
	long n;

	for (const struct fs_rv_name *r = fs_rv_names; r->name != NULL; r++) {
		if (strcasecmp(r->name, text) == 0) {
			*out = r->value;
			return 0;
		}
	}
	if (number(text, &n) != 0)
		return -1;
	*out = (CK_RV)n;
	return 0;
}

static int parse_function(const char *word)
{
	if (strcmp(word, "*") == 0)
		return 0;
	for (int code = 1; code < FS_FUNCTIONS; code++) {
		if (fs_function_names[code] != NULL && strcmp(fs_function_names[code], word) == 0)
			return code;
	}
	return -1;
}

static const struct {
	const char *name;
	enum fs_action action;
} actions[] = {
	{ "error", FS_ERROR }, { "delay", FS_DELAY }, { "hang", FS_HANG }, { "crash", FS_CRASH },
	{ "token-removed", FS_TOKEN_REMOVED }, { "close-sessions", FS_CLOSE_SESSIONS },
};

/* One line into *rule: 1 a rule, 0 nothing (blank or `concurrency`), -1 malformed. */
static int parse_line(const char *path, int number_, char *line, struct fs_rule *rule,
		      struct fs_rules *rules)
{
	char *save = NULL, *word, *fn, *act;
	size_t i;

	line[strcspn(line, "#\r\n")] = '\0';
	memset(rule, 0, sizeof *rule);
	fn = strtok_r(line, " \t", &save);
	if (fn == NULL)
		return 0;
	act = strtok_r(NULL, " \t", &save);
	if (strcmp(fn, "concurrency") == 0) {
		long n;

		if (act == NULL || number(act, &n) != 0 || n < 1 || strtok_r(NULL, " \t", &save)) {
			complain(path, number_, "concurrency needs one number of at least 1", act);
			return -1;
		}
		rules->concurrency = (int)n;
		return 0;
	}
	rule->code = parse_function(fn);
	if (rule->code < 0) {
		complain(path, number_, "unknown function", fn);
		return -1;
	}
	if (act == NULL) {
		complain(path, number_, "missing action", NULL);
		return -1;
	}
	for (i = 0; i < sizeof actions / sizeof actions[0]; i++) {
		if (strcmp(actions[i].name, act) == 0)
			break;
	}
	if (i == sizeof actions / sizeof actions[0]) {
		complain(path, number_, "unknown action", act);
		return -1;
	}
	rule->action = actions[i].action;
	rule->rv = CKR_DEVICE_ERROR;
	while ((word = strtok_r(NULL, " \t", &save)) != NULL) {
		char *eq = strchr(word, '=');
		long *target = NULL;

		if (eq == NULL) {
			complain(path, number_, "expected key=value", word);
			return -1;
		}
		*eq++ = '\0';
		if (strcmp(word, "rv") == 0 && rule->action == FS_ERROR) {
			if (parse_rv(eq, &rule->rv) != 0) {
				complain(path, number_, "unknown return code", eq);
				return -1;
			}
			continue;
		}
		if (strcmp(word, "ms") == 0 && rule->action == FS_DELAY)
			target = &rule->ms;
		else if (strcmp(word, "after") == 0)
			target = &rule->after;
		else if (strcmp(word, "count") == 0)
			target = &rule->count;
		else if (strcmp(word, "every") == 0)
			target = &rule->every;
		else if (strcmp(word, "procs") == 0)
			target = &rule->procs;
		if (target == NULL || number(eq, target) != 0) {
			complain(path, number_, "bad option", word);
			return -1;
		}
	}
	return 1;
}

void fs_rules_parse(const char *path, const char *text, struct fs_rules *out)
{
	const char *p = text;
	int number_ = 0;

	memset(out, 0, sizeof *out);
	while (*p != '\0') {
		const char *nl = strchr(p, '\n');
		size_t len = nl ? (size_t)(nl - p) : strlen(p);
		char line[160], copy[160];
		struct fs_rule rule;

		number_++;
		if (len >= sizeof line) {
			complain(path, number_, "line too long", NULL);
		} else {
			memcpy(line, p, len);
			line[len] = '\0';
			memcpy(copy, line, len + 1);
			if (parse_line(path, number_, line, &rule, out) == 1) {
				struct fs_rule *grown = realloc(out->rule, (size_t)(out->n + 1) * sizeof *grown);

				if (grown != NULL) {
					out->rule = grown;
					snprintf(rule.text, sizeof rule.text, "%s", copy);
					out->rule[out->n++] = rule;
				}
			}
		}
		p += len + (nl ? 1 : 0);
	}
}

void fs_rules_free(struct fs_rules *rules)
{
	free(rules->rule);
	memset(rules, 0, sizeof *rules);
}
