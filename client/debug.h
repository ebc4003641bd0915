/* p11p client — optional diagnostics on stderr (P11P_DEBUG=1): connection events only.
 * Never arguments, never data, never PINs. */
#ifndef P11P_DEBUG_H
#define P11P_DEBUG_H

extern int p11p_debug_on;

__attribute__((format(printf, 1, 2))) void p11p_debug(const char *fmt, ...);

#endif
