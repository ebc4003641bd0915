/* p11p client — optional diagnostics on stderr (P11P_DEBUG=1). */
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

#include "debug.h"

int p11p_debug_on;

void p11p_debug(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	if (!p11p_debug_on)
		return;
	n = snprintf(line, sizeof line, "p11p-client[%ld]: ", (long)getpid());
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
	va_end(ap);
	fprintf(stderr, "%s\n", line);
}
