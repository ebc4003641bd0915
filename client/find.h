/* p11p client — searches answered in the library (find.c). C_FindObjectsInit asks the
 * daemon for the whole result at once (P11P_FN_FIND_ALL); while it is kept here,
 * C_FindObjects hands it out and C_FindObjectsFinal ends it without a round trip. The
 * generated stubs of the three functions (p11p_wire_*) are the way to the daemon. */
#ifndef P11P_FIND_H
#define P11P_FIND_H

#include "gen/wire.h"

/* p11p's own function code P11P_FN_FIND_ALL (gen/codes.h, from functions.spec):
 * [FIND_ALL, session, template] -> [rv, handles or nil]. On CKR_OK with handles, the
 * search is complete and over on the daemon's side; nil: the daemon keeps the search
 * (C_FindObjects and C_FindObjectsFinal travel). Any other rv is C_FindObjectsInit's. */

/* Forgets every search kept (C_Initialize, C_Finalize; a forked child's copies too). */
void p11p_find_reset(void);

#endif
