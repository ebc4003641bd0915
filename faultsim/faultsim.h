/* p11p-faultsim — shared declarations: the wrapped module, the rule engine's two hooks
 * around every call, and the tables generated from protocol/functions.spec. */
#ifndef P11P_FAULTSIM_H
#define P11P_FAULTSIM_H

#include <p11-kit/pkcs11.h>

#define FS_FUNCTIONS 69 /* codes 1..68, as in protocol/functions.spec */

struct fs_rv_name {
	const char *name;
	CK_RV value;
};

extern CK_FUNCTION_LIST_PTR fs_real;
extern CK_FUNCTION_LIST fs_function_list;
extern const char *const fs_function_names[FS_FUNCTIONS];
extern const unsigned char fs_function_scope[FS_FUNCTIONS];
extern const struct fs_rv_name fs_rv_names[];

/* Before the real call: 1 when the rules answer the call themselves (*rv set). */
int fs_before(int code, CK_RV *rv);
/* After the real call (releases the concurrency slot). */
void fs_after(int code);

/* faultsim.c: the functions a removed token or loading changes */
CK_RV fs_C_Initialize(CK_VOID_PTR args);
CK_RV fs_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);
CK_RV fs_C_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR slots, CK_ULONG_PTR count);
CK_RV fs_C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info);

/* rules.c */
enum fs_action { FS_ERROR, FS_DELAY, FS_HANG, FS_CRASH, FS_TOKEN_REMOVED, FS_CLOSE_SESSIONS };

struct fs_rule {
	int code; /* 0: every function */
	enum fs_action action;
	CK_RV rv;
	long ms, after, count, every, procs;
	long seen, applied; /* counters */
	int proc_in;        /* procs=N: 0 not decided yet, 1 this process counts, -1 not */
	int fired;          /* close-sessions: done for this appearance of the rule */
	char text[160];     /* the line, to carry counters over a re-read */
};

struct fs_rules {
	struct fs_rule *rule;
	int n;
	int concurrency; /* 0: unlimited */
};

/* Parses a rules file; malformed lines are reported on stderr and skipped. */
void fs_rules_parse(const char *path, const char *text, struct fs_rules *out);
void fs_rules_free(struct fs_rules *rules);

#endif
