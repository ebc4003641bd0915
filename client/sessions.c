/* p11p client — sessions the library opens itself; see sessions.h. The table holds every
 * session this library opened and has not closed (its own and the daemon's), under the
 * library's lock; round trips run outside it. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "call.h"
#include "direct.h"
#include "gen/codes.h"
#include "gen/versions.h"
#include "gen/wire.h"
#include "kept.h"
#include "link.h"
#include "sessions.h"
#include "state.h"

#define BUCKETS 256
#define KNOWN 16
#define PLAIN_FLAGS (CKF_SERIAL_SESSION | CKF_RW_SESSION)

struct ses {
	CK_SESSION_HANDLE h;
	CK_SLOT_ID slot;
	CK_FLAGS flags;
	int local;                  /* not opened at the daemon yet */
	struct ses *next;
};

static struct ses *table[BUCKETS];
static unsigned long count;            /* sessions in the table */
static atomic_ulong nlocal;            /* of them not opened at the daemon */
static CK_SESSION_HANDLE next_handle;
/* (slot, flags) the daemon opened a session with: the token is there and takes them */
static struct { CK_SLOT_ID slot; CK_FLAGS flags; } known[KNOWN];
static unsigned nknown;
static int so_login;                   /* a C_Login as SO was made: no more local opens */
static int disabled;                   /* P11P_CLIENT_OPEN=0 */
static atomic_ulong limit;             /* the daemon's max_sessions_per_app; 0: no local opens */

static int lock(void)
{
	return p11p_lock_acquire(&p11p_state.lock) == CKR_OK;
}

static void unlock(void)
{
	p11p_lock_release(&p11p_state.lock);
}

void p11p_sessions_reset(void)
{
	const char *env = secure_getenv("P11P_CLIENT_OPEN");

	for (unsigned i = 0; i < BUCKETS; i++) {
		while (table[i] != NULL) {
			struct ses *s = table[i];

			table[i] = s->next;
			free(s);
		}
	}
	count = nknown = 0;
	atomic_store(&nlocal, 0);
	atomic_store(&limit, 0);
	next_handle = P11P_CLIENT_FIRST;
	so_login = 0;
	disabled = env != NULL && strcmp(env, "0") == 0;
}

void p11p_sessions_welcome(unsigned features, unsigned long max_sessions)
{
	atomic_store(&limit, (features & P11P_FEATURE_client_open) ? max_sessions : 0);
}

/* ---- the table (under the lock) ---- */

static struct ses **bucket(CK_SESSION_HANDLE h)
{
	return &table[(h ^ (h >> 8)) % BUCKETS];
}

static struct ses *lookup(CK_SESSION_HANDLE h)
{
	struct ses *s = *bucket(h);

	while (s != NULL && s->h != h)
		s = s->next;
	return s;
}

static struct ses *add(CK_SESSION_HANDLE h, CK_SLOT_ID slot, CK_FLAGS flags, int local)
{
	struct ses *s = calloc(1, sizeof *s);

	if (s == NULL)
		return NULL;
	s->h = h;
	s->slot = slot;
	s->flags = flags;
	s->local = local;
	s->next = *bucket(h);
	*bucket(h) = s;
	count++;
	if (local)
		atomic_fetch_add(&nlocal, 1);
	return s;
}

static void drop(CK_SESSION_HANDLE h)
{
	struct ses **p = bucket(h);

	while (*p != NULL && (*p)->h != h)
		p = &(*p)->next;
	if (*p != NULL) {
		struct ses *s = *p;

		*p = s->next;
		if (s->local)
			atomic_fetch_sub(&nlocal, 1);
		count--;
		free(s);
	}
}

static int is_known(CK_SLOT_ID slot, CK_FLAGS flags)
{
	for (unsigned i = 0; i < nknown; i++)
		if (known[i].slot == slot && known[i].flags == flags)
			return 1;
	return 0;
}

/* A free handle of the library's range, or 0. */
static CK_SESSION_HANDLE mint(void)
{
	for (unsigned long tries = 0; tries <= count; tries++) {
		CK_SESSION_HANDLE h = next_handle;

		next_handle = h >= P11P_CLIENT_LAST ? P11P_CLIENT_FIRST : h + 1;
		if (lookup(h) == NULL)
			return h;
	}
	return 0;
}

/* A session of the library's on the slot (any slot: all) other than h, or 0. */
static CK_SESSION_HANDLE local_on(int all, CK_SLOT_ID slot, CK_SESSION_HANDLE h)
{
	for (unsigned i = 0; i < BUCKETS; i++)
		for (const struct ses *s = table[i]; s != NULL; s = s->next)
			if (s->local && (all || s->slot == slot) && s->h != h)
				return s->h;
	return 0;
}

/* Another session on the slot that the daemon holds. */
static int has_any(CK_SLOT_ID slot)
{
	for (unsigned i = 0; i < BUCKETS; i++)
		for (const struct ses *s = table[i]; s != NULL; s = s->next)
			if (s->slot == slot)
				return 1;
	return 0;
}

int p11p_sessions_slot(CK_SESSION_HANDLE h, CK_SLOT_ID *slot)
{
	const struct ses *s;
	int known = 0;

	if (lock()) {
		s = lookup(h);
		if (s != NULL) {
			*slot = s->slot;
			known = 1;
		}
		unlock();
	}
	return known;
}

static int daemon_has_other(CK_SLOT_ID slot, CK_SESSION_HANDLE h)
{
	for (unsigned i = 0; i < BUCKETS; i++)
		for (const struct ses *s = table[i]; s != NULL; s = s->next)
			if (!s->local && s->slot == slot && s->h != h)
				return 1;
	return 0;
}

/* ---- opening at the daemon ---- */

/* Opens session h at the daemon if it is still the library's own: on a member at once
 * (now), or only made known there (its first call places it; nothing on a member can
 * fail it). */
static CK_RV open_at_daemon(CK_SESSION_HANDLE h, int now)
{
	struct p11p_call c;
	struct ses *s;
	CK_SLOT_ID slot;
	CK_FLAGS flags;
	CK_RV rv;

	if (!lock())
		return CKR_GENERAL_ERROR;
	s = lookup(h);
	if (s == NULL || !s->local) {
		unlock();
		return CKR_OK;
	}
	slot = s->slot;
	flags = s->flags;
	unlock();
	p11p_call_start(&c, P11P_FN_OPEN_AT, 4);
	p11p_put_ulong(&c, slot);
	p11p_put_ulong(&c, flags);
	p11p_put_ulong(&c, h);
	p11p_put_ulong(&c, (CK_ULONG)now);
	p11p_call_run(&c, 0);
	rv = p11p_call_finish(&c);
	if (rv == CKR_OK && lock()) {
		s = lookup(h);
		if (s != NULL && s->local) {
			s->local = 0;
			atomic_fetch_sub(&nlocal, 1);
		}
		unlock();
	}
	/* what the call that needed the session can say of it: its token went away, or a
	 * daemon that cannot open it (a restart into an older build) */
	if (rv == CKR_SLOT_ID_INVALID || rv == CKR_TOKEN_NOT_PRESENT)
		rv = CKR_DEVICE_REMOVED;
	else if (rv == CKR_FUNCTION_NOT_SUPPORTED || rv == CKR_ARGUMENTS_BAD)
		rv = CKR_DEVICE_ERROR;
	return rv;
}

/* Opens the library's sessions on the slot (any slot: all) at the daemon, before a call
 * answered from the sessions there: on a member (now) before a login as SO and
 * C_InitToken (the token decides), made known before an open at the limit (the daemon
 * counts). */
static void open_all_at_daemon(int all, CK_SLOT_ID slot, int now)
{
	for (;;) {
		CK_SESSION_HANDLE h = 0;

		if (atomic_load(&nlocal) == 0 || !lock())
			return;
		h = local_on(all, slot, 0);
		unlock();
		if (h == 0 || open_at_daemon(h, now) != CKR_OK)
			return;
	}
}

void p11p_put_session(struct p11p_call *c, CK_SESSION_HANDLE h)
{
	if (c->err == CKR_OK && h >= P11P_CLIENT_FIRST && h <= P11P_CLIENT_LAST &&
	    atomic_load(&nlocal) > 0) {
		CK_RV rv = open_at_daemon(h, 1);

		if (rv != CKR_OK)
			p11p_fail(c, rv);
	}
	p11p_put_ulong(c, h);
}

/* ---- the entry points ---- */

/* 1: opened here; 0: the daemon opens it; -1: the same, after the library's sessions are
 * opened there (at the limit: the daemon counts them) */
static int open_here(CK_SLOT_ID slot, CK_FLAGS flags, CK_SESSION_HANDLE_PTR ph)
{
	unsigned long max = atomic_load(&limit);
	CK_SESSION_HANDLE h;
	int done = 0;

	if (disabled || max == 0 || ph == NULL || !(flags & CKF_SERIAL_SESSION) ||
	    (flags & ~(CK_FLAGS)PLAIN_FLAGS) || !lock())
		return 0;
	if (count >= max)
		done = -1;
	else if (!so_login && is_known(slot, flags) && (h = mint()) != 0 &&
		 add(h, slot, flags, 1) != NULL) {
		*ph = h;
		done = 1;
	}
	unlock();
	return done;
}

P11P_EXPORT CK_RV C_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
				CK_SESSION_HANDLE_PTR ph)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	switch (open_here(slot, flags, ph)) {
	case 1:
		p11p_leave();
		return CKR_OK;
	case -1:
		open_all_at_daemon(1, 0, 0);
		break;
	}
	p11p_leave();
	rv = p11p_wire_C_OpenSession(slot, flags, app, notify, ph);
	if (rv == CKR_OK && ph != NULL && lock()) {
		if (lookup(*ph) == NULL)
			(void)add(*ph, slot, flags, 0); /* without it: counted short, as before */
		if (nknown < KNOWN && !is_known(slot, flags) && (flags & ~(CK_FLAGS)PLAIN_FLAGS) == 0) {
			known[nknown].slot = slot;
			known[nknown++].flags = flags;
		}
		unlock();
	}
	return rv;
}

P11P_EXPORT CK_RV C_CloseSession(CK_SESSION_HANDLE h)
{
	CK_SESSION_HANDLE keep = 0;
	CK_RV rv = p11p_enter();
	CK_SLOT_ID slot = 0;
	int known = 0, last = 0;
	struct ses *s;

	if (rv != CKR_OK)
		return rv;
	if (lock()) {
		s = lookup(h);
		if (s != NULL) {
			slot = s->slot;
			known = 1;
		}
		if (s != NULL && s->local) {
			drop(h);
			unlock();
			p11p_plane_forget(h);
			p11p_leave();
			return CKR_OK;
		}
		/* the daemon's last session on the token: it would log the application out */
		if (s != NULL && atomic_load(&nlocal) > 0 && !daemon_has_other(s->slot, h))
			keep = local_on(0, s->slot, h);
		unlock();
	}
	if (keep != 0)
		(void)open_at_daemon(keep, 0); /* made known: its login stays */
	rv = p11p_wire_C_CloseSession(h); /* the daemon revokes the binding */
	p11p_plane_forget(h);
	if ((rv == CKR_OK || rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED) && lock()) {
		drop(h);
		last = known && !has_any(slot);
		unlock();
	}
	if (last) /* the application's last session on the token: logged out (§5.6) */
		p11p_kept_logout(slot);
	p11p_leave();
	return rv;
}

P11P_EXPORT CK_RV C_CloseAllSessions(CK_SLOT_ID slot)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	rv = p11p_wire_C_CloseAllSessions(slot);
	p11p_plane_forget_slot(slot);
	if (rv == CKR_OK && lock()) {
		for (unsigned i = 0; i < BUCKETS; i++) {
			struct ses *s = table[i];

			while (s != NULL) {
				struct ses *next = s->next;

				if (s->slot == slot)
					drop(s->h);
				s = next;
			}
		}
		unlock();
	}
	if (rv == CKR_OK)
		p11p_kept_logout(slot);
	p11p_leave();
	return rv;
}

/* A login as SO: the token refuses it while R/O sessions exist, and refuses R/O sessions
 * while it lasts; the daemon decides both from the sessions it has. */
P11P_EXPORT CK_RV C_Login(CK_SESSION_HANDLE h, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	CK_RV rv = p11p_enter();
	const struct ses *s;
	CK_SLOT_ID slot = 0;
	int have_slot = 0;

	if (rv != CKR_OK)
		return rv;
	if (user == CKU_SO && lock()) {
		so_login = 1;
		s = lookup(h);
		if (s != NULL) {
			slot = s->slot;
			have_slot = 1;
		}
		unlock();
		if (have_slot)
			open_all_at_daemon(0, slot, 1);
	}
	p11p_plane_settle(h); /* as the generated stubs do (client/gen.py) */
	rv = p11p_wire_C_Login(h, user, pin, len);
	/* kept for a daemon that loses the application's state (kept.h); a context-specific
	 * login is an operation's, not the token's */
	if (rv == CKR_OK && user != CKU_CONTEXT_SPECIFIC && p11p_sessions_slot(h, &slot))
		p11p_kept_login(slot, user, pin, len);
	p11p_leave();
	return rv;
}

/* A new PIN for the user logged in (or CKU_USER): the kept login follows it. */
P11P_EXPORT CK_RV C_SetPIN(CK_SESSION_HANDLE h, CK_UTF8CHAR_PTR old, CK_ULONG old_len,
			   CK_UTF8CHAR_PTR pin, CK_ULONG len)
{
	CK_RV rv = p11p_enter();
	CK_SLOT_ID slot;

	if (rv != CKR_OK)
		return rv;
	p11p_plane_settle(h);
	rv = p11p_wire_C_SetPIN(h, old, old_len, pin, len);
	if (rv == CKR_OK && p11p_sessions_slot(h, &slot))
		p11p_kept_set_pin(slot, pin, len);
	p11p_leave();
	return rv;
}

/* The token refuses it while sessions are open on it (CKR_SESSION_EXISTS). */
P11P_EXPORT CK_RV C_InitToken(CK_SLOT_ID slot, CK_UTF8CHAR_PTR pin, CK_ULONG len, CK_UTF8CHAR_PTR label)
{
	CK_RV rv = p11p_enter();

	if (rv != CKR_OK)
		return rv;
	open_all_at_daemon(0, slot, 1);
	rv = p11p_wire_C_InitToken(slot, pin, len, label);
	p11p_leave();
	return rv;
}
