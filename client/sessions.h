/* p11p client — sessions the library opens itself (the link feature client_open).
 *
 * A C_OpenSession that the daemon answered before with the same slot and flags (a
 * serial session, read-only or read-write) is answered here: the library names the
 * session with a handle of its own range (0x40000000..0x7FFFFFFF; the daemon's are
 * below) and sends nothing. The daemon learns of the session at its first call that
 * travels: OPEN_AT [slot, flags, handle] opens it there under that handle, and the
 * call follows. A session closed before any such call costs no round trip at all.
 *
 * What PKCS#11 says of a token's sessions holds as with the daemon's own opens:
 * - an application with an SO login (or one tried) gets no session of the library's
 *   (R/O sessions are refused then, the daemon answers that);
 * - before a C_Login as SO and a C_InitToken, the library's sessions on that slot are
 *   opened at the daemon (which then refuses them as the token would);
 * - the application is logged out when its last session on a token closes: before the
 *   daemon closes what it holds as the last one, a session of the library's on that
 *   slot is opened there;
 * - no more sessions than the daemon's max_sessions_per_app (told in the hello).
 * protocol/README.md "Client link: calls" (OPEN_AT). */
#ifndef P11P_SESSIONS_H
#define P11P_SESSIONS_H

#include "codec.h"

#define P11P_CLIENT_FIRST 0x40000000ul
#define P11P_CLIENT_LAST 0x7ffffffful

/* Reads P11P_CLIENT_OPEN (0: every C_OpenSession goes to the daemon); forgets every
 * session (C_Initialize, C_Finalize, a forked child). */
void p11p_sessions_reset(void);
/* A hello agreed on these features and told this limit (0: none told). */
void p11p_sessions_welcome(unsigned features, unsigned long max_sessions);
/* The slot of a session the library knows (1), or 0. */
int p11p_sessions_slot(CK_SESSION_HANDLE h, CK_SLOT_ID *slot);
/* Puts a session argument of a request to the daemon: a session of the library's is
 * opened there first (an error then is the call's). */
void p11p_put_session(struct p11p_call *c, CK_SESSION_HANDLE h);

#endif
