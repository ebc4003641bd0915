/* p11p client — the one notice an operator must see without P11P_DEBUG: the daemon
 * cannot be reached. Once per process (an atomic flag; a forked child does not say it
 * again), one line on stderr and one to syslog (LOG_USER, ident "p11p-client").
 *
 * The syslog line is sent to /dev/log here rather than through openlog()/syslog(): those
 * keep one ident and facility per process, and a library must not change the
 * application's (closelog() would drop the ident the application chose). Best effort:
 * no syslog daemon, no line, no error. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "notice.h"

static atomic_flag said = ATOMIC_FLAG_INIT;

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n <= 0)
			return;
		buf += n;
		len -= (size_t)n;
	}
}

/* RFC 3164 as glibc's syslog() writes it: <PRI>Mmm dd hh:mm:ss ident[pid]: message,
 * month names in English whatever the application's locale. */
static void to_syslog(const char *message)
{
	static const char months[12][4] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
					    "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };
	struct sockaddr_un sa = { .sun_family = AF_UNIX, .sun_path = "/dev/log" };
	char line[1024];
	time_t now = time(NULL);
	struct tm tm;
	int fd, n;

	if (localtime_r(&now, &tm) == NULL)
		return;
	n = snprintf(line, sizeof line, "<%d>%s %2d %02d:%02d:%02d p11p-client[%ld]: %s",
		     LOG_USER | LOG_WARNING, months[tm.tm_mon % 12], tm.tm_mday, tm.tm_hour,
		     tm.tm_min, tm.tm_sec, (long)getpid(), message);
	if (n < 0)
		return;
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return;
	(void)sendto(fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1,
		     MSG_NOSIGNAL, (struct sockaddr *)&sa, sizeof sa);
	close(fd);
}

void p11p_notice_unreachable(const char *path, const char *why)
{
	static const char prefix[] = "p11p-client: ";
	char line[1024];
	size_t len;
	int n;

	if (atomic_flag_test_and_set(&said))
		return;
	n = snprintf(line, sizeof line,
		     "%scannot reach the p11p daemon at %s (%s); run 'p11p doctor'\n",
		     prefix, path, why);
	if (n < 0)
		return;
	len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
	line[len - 1] = '\n'; /* kept when the line was cut */
	write_all(STDERR_FILENO, line, len);
	line[len - 1] = '\0';
	to_syslog(line + sizeof prefix - 1);
}
