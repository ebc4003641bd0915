/* p11p client tests — a fake link (client/link.h) for the codec test: no socket; the
 * request is kept as text for inspection and the reply is what the test scripted. */
#ifndef P11P_TEST_FAKE_LINK_H
#define P11P_TEST_FAKE_LINK_H

#include <msgpack.h>

#include "link.h"

extern int fake_initialized;        /* p11p_enter's answer */
extern CK_RV fake_transport_rv;     /* what the round trip itself returns */
extern msgpack_sbuffer fake_reply;  /* the scripted reply body */
extern char fake_request[16384];    /* the last request, as text */
extern unsigned fake_roundtrips;
extern long fake_in_flight;
extern int fake_released_healthy;   /* how the last call gave its connection back */

#endif
