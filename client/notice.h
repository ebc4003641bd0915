/* p11p client — the one notice an operator must see without P11P_DEBUG: the daemon
 * cannot be reached. Said once per process, on stderr and to syslog. */
#ifndef P11P_NOTICE_H
#define P11P_NOTICE_H

/* "p11p-client: cannot reach the p11p daemon at PATH (WHY); run 'p11p doctor'", the
 * first time only: later calls do nothing. */
void p11p_notice_unreachable(const char *path, const char *why);

#endif
