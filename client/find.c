/* p11p client — searches answered in the library (see find.h). A small table holds the
 * searches of this process, one per session at most; when it is full, searches travel
 * as usual. The table is guarded by the library's lock (the application's mutex
 * callbacks when it gave them). */
#include <stdlib.h>
#include <string.h>

#include "call.h"
#include "direct.h"
#include "find.h"
#include "gen/codes.h"
#include "link.h"
#include "sessions.h"
#include "state.h"

#define P11P_FIND_SLOTS 64

struct p11p_found {
	int state;                  /* FREE, ASKING (C_FindObjectsInit on its way), READY */
	CK_SESSION_HANDLE session;
	CK_OBJECT_HANDLE *handles;  /* malloc'd, count of them */
	CK_ULONG count, next;
};

enum { FREE, ASKING, READY };

static struct p11p_found found[P11P_FIND_SLOTS];

static int lock(void)
{
	return p11p_lock_acquire(&p11p_state.lock) == CKR_OK;
}

static void unlock(void)
{
	p11p_lock_release(&p11p_state.lock);
}

static struct p11p_found *lookup(CK_SESSION_HANDLE session, int state)
{
	for (int i = 0; i < P11P_FIND_SLOTS; i++)
		if (found[i].state == state && found[i].session == session)
			return &found[i];
	return NULL;
}

static void drop(struct p11p_found *f)
{
	free(f->handles);
	memset(f, 0, sizeof *f);
}

void p11p_find_reset(void)
{
	for (int i = 0; i < P11P_FIND_SLOTS; i++)
		drop(&found[i]);
}

/* 1: a slot is reserved for this session's search; 0: the table is full (the search
 * travels as usual); -1: a search kept here is active on the session. */
static int reserve(CK_SESSION_HANDLE session, struct p11p_found **out)
{
	int r = 0;

	*out = NULL;
	if (!lock())
		return 0;
	if (lookup(session, READY) != NULL || lookup(session, ASKING) != NULL) {
		r = -1;
	} else {
		*out = lookup(0, FREE);
		if (*out != NULL) {
			(*out)->state = ASKING;
			(*out)->session = session;
			r = 1;
		}
	}
	unlock();
	return r;
}

/* The handles of a FIND_ALL reply, into the reserved slot (READY), or the slot freed
 * when the daemon keeps the search or the call failed. */
static void take_handles(struct p11p_call *c, struct p11p_found *f)
{
	const msgpack_object *o = c->err == CKR_OK ? p11p_next_out(c) : NULL;
	CK_OBJECT_HANDLE *handles = NULL;
	CK_ULONG n = 0;

	if (c->err == CKR_OK && c->rv == CKR_OK && o != NULL) {
		if (o->type != MSGPACK_OBJECT_ARRAY) {
			p11p_malformed(c);
		} else {
			n = o->via.array.size;
			handles = malloc((n ? n : 1) * sizeof *handles);
			if (handles == NULL) {
				c->err = CKR_HOST_MEMORY;
			} else {
				for (CK_ULONG i = 0; i < n; i++) {
					if (p11p_obj_ulong(&o->via.array.ptr[i], &handles[i]) != 0) {
						p11p_malformed(c);
						break;
					}
				}
			}
		}
	}
	(void)lock();
	if (c->err == CKR_OK && c->rv == CKR_OK && o != NULL) {
		f->handles = handles;
		f->count = n;
		f->next = 0;
		f->state = READY;
	} else {
		free(handles);
		drop(f);
	}
	unlock();
}

P11P_EXPORT CK_RV C_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate,
				    CK_ULONG ulCount)
{
	struct p11p_call c;
	struct p11p_found *f;
	CK_RV rv = p11p_enter(); /* held throughout: C_Finalize waits for this call */
	int kept;

	if (rv != CKR_OK)
		return rv;
	p11p_plane_settle(hSession); /* the daemon (the member) says if a search may start */
	kept = reserve(hSession, &f);
	if (kept < 0) {
		rv = CKR_OPERATION_ACTIVE;
	} else if (kept == 0) {
		rv = p11p_wire_C_FindObjectsInit(hSession, pTemplate, ulCount);
	} else {
		p11p_call_start(&c, P11P_FN_FIND_ALL, 2);
		p11p_put_session(&c, hSession);
		p11p_put_template(&c, pTemplate, ulCount);
		p11p_call_run(&c, 1);
		take_handles(&c, f);
		rv = p11p_call_finish(&c);
	}
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject,
				CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount)
{
	struct p11p_found *f;
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	if (!lock()) {
		p11p_leave();
		return CKR_GENERAL_ERROR;
	}
	f = lookup(hSession, READY);
	if (f == NULL) {
		unlock();
		rv = p11p_wire_C_FindObjects(hSession, phObject, ulMaxObjectCount, pulObjectCount);
		p11p_leave();
		return rv;
	}
	if (pulObjectCount == NULL || (phObject == NULL && ulMaxObjectCount > 0)) {
		rv = CKR_ARGUMENTS_BAD;
	} else {
		CK_ULONG n = f->count - f->next;

		if (n > ulMaxObjectCount)
			n = ulMaxObjectCount;
		if (n > 0)
			memcpy(phObject, f->handles + f->next, n * sizeof *phObject);
		f->next += n;
		*pulObjectCount = n;
	}
	unlock();
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE hSession)
{
	struct p11p_found *f;
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	if (!lock()) {
		p11p_leave();
		return CKR_GENERAL_ERROR;
	}
	f = lookup(hSession, READY);
	if (f != NULL)
		drop(f);
	unlock();
	rv = f != NULL ? CKR_OK : p11p_wire_C_FindObjectsFinal(hSession);
	p11p_leave();
	return rv;
}
