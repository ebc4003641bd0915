/* p11p client — one Cryptoki call as the generated stubs make it: start (is the library
 * initialised?), the codec's put helpers, run (one round trip, reply parsed), the get
 * helpers, finish (the rv, or the first local error). */
#ifndef P11P_CALL_H
#define P11P_CALL_H

#include "codec.h"

#define P11P_EXPORT __attribute__((visibility("default")))

void p11p_call_start(struct p11p_call *c, unsigned long code, unsigned nargs);
void p11p_call_run(struct p11p_call *c, unsigned nouts);
CK_RV p11p_call_finish(struct p11p_call *c);

#endif
