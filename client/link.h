/* p11p client — the link to the daemon as the call layer sees it: is the library
 * initialised in this process, and one request/reply round trip. Implemented by state.c
 * and pool.c in the library, and by tests/client/fake_link.c in the codec test, so the
 * codec and the stubs are tested without a socket. */
#ifndef P11P_LINK_H
#define P11P_LINK_H

#include <stddef.h>

#include "p11p-extra.h"

/* CKR_OK, counting the caller as in flight, or CKR_CRYPTOKI_NOT_INITIALIZED. */
CK_RV p11p_enter(void);
/* Ends what p11p_enter began. */
void p11p_leave(void);
/* Sends the request frame (its first 4 bytes are left for the header) and returns the
 * reply frame's body in *reply (malloc'd; the caller frees it). On CKR_OK the
 * connection stays the caller's (*conn) until p11p_release: a reply that turns out
 * malformed while it is decoded drops its connection. */
CK_RV p11p_roundtrip(unsigned long code, char *frame, size_t len, char **reply,
		     size_t *reply_len, void **conn);
/* What p11p_roundtrip returns when nobody answers at the socket (no such file, nobody
 * listening, not allowed to connect): the stubs turn it into CKR_DEVICE_ERROR, except
 * C_GetSlotList, which lists no slot (as p11-kit's client does), so that loaders such as
 * p11-kit-proxy.so keep working without the daemon. Never given to the application. */
#define P11P_RV_NO_DAEMON (CKR_VENDOR_DEFINED | 0x70110001UL)
/* The daemon's answer to a call it did not begin because it stops for a restart: the
 * call goes to the next daemon (daemon/server.py RETRY; protocol/README.md) */
#define P11P_RV_RETRY (CKR_VENDOR_DEFINED | 0x70110002UL)
/* Gives the connection of a round trip back; healthy 0 closes it. */
void p11p_release(void *conn, int healthy);

#endif
