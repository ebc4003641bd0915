/* p11p client — the data plane's connections: per helper listener (an endpoint: its
 * name, token, time-out and the codes it sends back to the daemon) a stack of idle
 * connections, and one call's round trip on one of them (plane_state.h). The stacks are
 * under the library's lock; a call runs outside it, on a connection of its own. */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "box.h"
#include "call.h"
#include "direct.h"
#include "link.h"
#include "plane_state.h"
#include "state.h"
#include "transport.h"

#define EP_IDLE 16             /* idle connections kept per endpoint */
#define SPIN_NS 60000          /* a lone call waits this long awake for its reply, at least */
#define SPIN_MAX_US 1500       /* ... and longer for a function whose last one took less */
#define RTTS 64                /* functions whose last lone round trip is remembered */

/* An endpoint's name, token, time-out and fallback list are set when it is made and
 * never change (a helper's listener keeps its name for life), so a call reads them
 * without the lock; its idle connections are under the lock. */
struct ep {
	struct ep *next;
	char name[101];
	size_t name_len;
	unsigned char token[TOKEN];
	int timeout_ms;
	CK_RV fallback[MAX_FALLBACK];
	unsigned nfallback;
	int cpu_hint;               /* its helper follows the CPU hint (p11p_send_hinted) */
	int pairs;                  /* its helper answers a pair sent at once (p11p_send_pair) */
	int mailbox;                /* its helper gives a connection a mailbox (client/box.h) */
	int idle[EP_IDLE];
	struct p11p_box *idle_box[EP_IDLE];  /* each idle connection's mailbox, or NULL */
	const void *last[EP_IDLE];  /* the thread that gave each idle connection back */
	unsigned nidle;
};

static struct ep *eps;
static atomic_int in_flight;   /* data-plane calls waiting for their reply */

/* ---- endpoints and their connections ---- */

int p11p_ep_fallback(const struct ep *ep, CK_RV rv)
{
	for (unsigned i = 0; i < ep->nfallback; i++)
		if (ep->fallback[i] == rv)
			return 1;
	return 0;
}

static __thread char me;      /* its address tells this thread from the others */

static void link_close(int fd, struct p11p_box *box)
{
	p11p_box_drop(box);
	close(fd);
}

/* A connection to the endpoint and its mailbox (*box, NULL: none): an idle one, or a new
 * one that has sent the token (and asked for a mailbox, when the helper gives them). */
static int ep_take(struct ep *ep, struct p11p_box **box, int64_t deadline)
{
	struct sockaddr_un addr;
	int fd = -1, broken;

	*box = NULL;
	if (p11p_plane_lock()) {
		if (ep->nidle > 0) {
			unsigned i = ep->nidle - 1;

			/* the one this thread used last, when idle: a client thread keeps talking
			 * to one helper thread (a connection is served by one), which the
			 * scheduler then keeps near it */
			for (unsigned k = 0; k < ep->nidle; k++)
				if (ep->last[k] == &me) {
					i = k;
					break;
				}
			fd = ep->idle[i];
			*box = ep->idle_box[i];
			ep->nidle--;
			ep->idle[i] = ep->idle[ep->nidle];
			ep->idle_box[i] = ep->idle_box[ep->nidle];
			ep->last[i] = ep->last[ep->nidle];
		}
		p11p_plane_unlock();
	}
	if (fd >= 0)
		return fd;
	memset(&addr, 0, sizeof addr);
	addr.sun_family = AF_UNIX;
	memcpy(addr.sun_path + 1, ep->name, ep->name_len);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&addr,
		    (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + ep->name_len)) != 0) {
		close(fd);
		return -1;
	}
	/* the token: 16 bytes into an empty socket buffer, never a short write */
	if (send(fd, ep->token, TOKEN, MSG_NOSIGNAL) != TOKEN) {
		close(fd);
		return -1;
	}
	if (ep->mailbox) {
		*box = p11p_box_ask(fd, deadline, &broken);
		if (broken) {
			close(fd);
			return -1;
		}
	}
	return fd;
}

static void ep_give(struct ep *ep, int fd, struct p11p_box *box)
{
	uint32_t w = box != NULL ? atomic_load(&box->word) : P11P_BOX_READY;

	/* a mailbox the helper closed meanwhile (it passed to another application) */
	if (w != P11P_BOX_READY && w != P11P_BOX_SOCKET) {
		link_close(fd, box);
		return;
	}
	if (p11p_plane_lock()) {
		if (ep->nidle < EP_IDLE) {
			ep->last[ep->nidle] = &me;
			ep->idle_box[ep->nidle] = box;
			ep->idle[ep->nidle++] = fd;
			fd = -1;
		}
		p11p_plane_unlock();
	}
	if (fd >= 0)
		link_close(fd, box);
}

/* Under the lock: the endpoint of this name, or a new one made from the DIRECT_BIND
 * reply's fields (f: name, token, ..., [rv...]). */
struct ep *p11p_ep_get(const msgpack_object *f, int timeout_ms, int cpu_hint, int pairs,
		       int mailbox)
{
	const msgpack_object *rvs = &f[5];
	struct ep *ep;
	CK_RV rv;

	for (ep = eps; ep != NULL; ep = ep->next)
		if (ep->name_len == f[0].via.bin.size &&
		    memcmp(ep->name, f[0].via.bin.ptr, ep->name_len) == 0)
			return ep;
	ep = calloc(1, sizeof *ep);
	if (ep == NULL)
		return NULL;
	memcpy(ep->name, f[0].via.bin.ptr, f[0].via.bin.size);
	ep->name_len = f[0].via.bin.size;
	memcpy(ep->token, f[1].via.bin.ptr, TOKEN);
	ep->timeout_ms = timeout_ms;
	ep->cpu_hint = cpu_hint;
	ep->pairs = pairs;
	ep->mailbox = mailbox;
	for (uint32_t i = 0; i < rvs->via.array.size; i++)
		if (p11p_obj_ulong(&rvs->via.array.ptr[i], &rv) == 0)
			ep->fallback[ep->nfallback++] = rv;
	ep->next = eps;
	eps = ep;
	return ep;
}

/* Its helper is gone or broke a connection: the idle connections go too. */
static void ep_broken(struct ep *ep)
{
	int fds[EP_IDLE];
	struct p11p_box *boxes[EP_IDLE];
	unsigned n = 0;

	if (!p11p_plane_lock())
		return;
	while (ep->nidle > 0) {
		ep->nidle--;
		boxes[n] = ep->idle_box[ep->nidle];
		fds[n++] = ep->idle[ep->nidle];
	}
	p11p_plane_unlock();
	while (n > 0) {
		n--;
		link_close(fds[n], boxes[n]);
	}
}

/* ---- one call on the data plane ---- */

/* The reply of a quick call comes back within a few tens of microseconds; blocking
 * for it costs a wake-up of an idle CPU (about 50 µs here, and more on a virtual machine
 * whose idle CPU halts: the host wakes it). So a call that is the only one in flight in
 * this process watches for it awake (its mailbox, or its socket), for SPIN_NS, or when
 * its function's last lone round trip took less than SPIN_MAX_US (an RSA signature on a
 * software token: some 600 µs, of which the wake-up was a fifth), for that long and a
 * quarter more; a function whose replies are long in coming (a network HSM's
 * milliseconds) is worth no CPU awake, nor is one that ran past its estimate: it blocks
 * after SPIN_NS. With more calls in flight the CPUs have other work, and it blocks at
 * once. */
static _Atomic uint64_t lone_rtt[RTTS]; /* by code, hashed: code << 32 | microseconds */

static int64_t spin_ns(unsigned long code)
{
	uint64_t e = atomic_load_explicit(&lone_rtt[code % RTTS], memory_order_relaxed);
	int64_t us = (int64_t)(e & 0xffffffffu);

	if ((e >> 32) != (code & 0xffffffffu) || us > SPIN_MAX_US || (us + us / 4) * 1000 < SPIN_NS)
		return SPIN_NS;
	return (us + us / 4) * 1000;
}

static void lone_took(unsigned long code, int64_t ns)
{
	uint64_t us = ns > 0 ? (uint64_t)ns / 1000 : 0;

	if (us > 0xffffffffu)
		us = 0xffffffffu;
	atomic_store_explicit(&lone_rtt[code % RTTS], (uint64_t)(code & 0xffffffffu) << 32 | us,
			      memory_order_relaxed);
}

/* Whether this process may run on more than one CPU: on one, a thread awake would only
 * keep the helper from the CPU its reply needs. */
static int several_cpus(void)
{
	static atomic_int known; /* 0: not yet; 1: one; 2: several */
	int k = atomic_load_explicit(&known, memory_order_relaxed);

	if (k == 0) {
		cpu_set_t set;

		k = sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 1 ? 2 : 1;
		atomic_store_explicit(&known, k, memory_order_relaxed);
	}
	return k == 2;
}

/* While a lone call may keep watching: no other call began meanwhile (its helper may
 * need this CPU). */
static int still_lone(void)
{
	return atomic_load_explicit(&in_flight, memory_order_relaxed) <= 1;
}

/* How long a call watches for its reply awake (0: it blocks at once). */
static int64_t awake_ns(unsigned long code)
{
	if (!still_lone() || !several_cpus())
		return 0;
	return spin_ns(code);
}

/* The socket's awake wait (the mailbox's: client/box.c). */
static void await_reply(int fd, int64_t budget)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int64_t start;

	if (budget == 0)
		return;
	start = p11p_now_ns();
	do {
		if (poll(&p, 1, 0) != 0 || !still_lone())
			return;
	} while (p11p_now_ns() - start < budget);
}

/* One call `c`, or an operation's deferred init `ci` and its next call `c` in one send
 * (to a helper that answers pairs), on the connection `fd`: through its mailbox when it
 * has one and they fit, else on the socket; the replies into the calls. */
static CK_RV exchange(const struct ep *ep, int fd, struct p11p_box *box, struct p11p_call *ci,
		      struct p11p_call *c, int64_t deadline)
{
	/* with other calls in flight this thread blocks for the reply: the helper thread is
	 * asked onto its CPU (helper/fast_conn.c, follow). A lone call watches for its reply
	 * awake instead, and the helper thread had better run on another CPU. */
	int lone = atomic_fetch_add_explicit(&in_flight, 1, memory_order_relaxed) == 0;
	int64_t sent = lone ? p11p_now_ns() : 0;
	int cpu = ep->cpu_hint && !lone ? sched_getcpu() : -1, r = 1;
	int64_t awake = lone ? awake_ns(c->code) : 0;
	struct p11p_call *first = ci != NULL ? ci : c;
	CK_RV rv = CKR_DEVICE_ERROR;

	if (box != NULL)
		r = p11p_box_round(fd, box, first->req.data, first->req.size,
				   ci != NULL ? c->req.data : NULL, ci != NULL ? c->req.size : 0, cpu,
				   deadline, awake, still_lone, &first->reply,
				   &first->reply_len, ci != NULL ? &c->reply : NULL, &c->reply_len);
	if (r == 0) {
		rv = CKR_OK;
	} else if (r == 1) {
		if (ci != NULL)
			rv = p11p_send_pair(fd, ci->req.data, ci->req.size, c->req.data, c->req.size,
					    deadline, cpu);
		else if (ep->cpu_hint)
			rv = p11p_send_hinted(fd, c->req.data, c->req.size, deadline, cpu);
		else
			rv = p11p_send_frame(fd, c->req.data, c->req.size, deadline);
		if (rv == CKR_OK) {
			await_reply(fd, awake);
			rv = ci != NULL ? p11p_recv_two(fd, &ci->reply, &ci->reply_len, &c->reply,
							&c->reply_len, deadline)
					: p11p_recv_frame(fd, &c->reply, &c->reply_len, deadline);
		}
	}
	if (lone && rv == CKR_OK)
		lone_took(c->code, p11p_now_ns() - sent);
	atomic_fetch_sub_explicit(&in_flight, 1, memory_order_relaxed);
	return rv;
}

/* The connection failed (its calls' replies did not come, or did not parse). */
static int failed(struct ep *ep, int fd, struct p11p_box *box, int64_t deadline, int *why)
{
	link_close(fd, box);
	*why = deadline >= 0 && p11p_now_ms() >= deadline ? P11P_WHY_TIMEOUT : P11P_WHY_BROKEN;
	if (*why == P11P_WHY_BROKEN)
		ep_broken(ep);
	return 1;
}

int p11p_plane_run(struct p11p_call *c, const struct p11p_bound *b, unsigned nouts, int *why)
{
	struct ep *ep = b->ep;
	int64_t deadline = p11p_deadline(ep->timeout_ms);
	struct p11p_box *box;
	CK_RV rv;
	int fd;

	if (c->err)
		return 0; /* a local error (bad arguments): answered as the stub would */
	fd = ep_take(ep, &box, deadline);
	if (fd < 0) {
		*why = P11P_WHY_BROKEN;
		return 1;
	}
	rv = exchange(ep, fd, box, NULL, c, deadline);
	if (rv == CKR_OK)
		p11p_reply_parse(c, nouts);
	if (rv != CKR_OK || c->err)
		return failed(ep, fd, box, deadline, why);
	ep_give(ep, fd, box);
	if (p11p_ep_fallback(ep, c->rv)) {
		*why = P11P_WHY_RETURNED;
		return 1;
	}
	return 0;
}

/* An operation's deferred init `ci` and its next call `c` in one send, their replies read
 * at one wake-up (to a helper that answers pairs). 0: both replies parsed (what they
 * answer is the caller's to read: a fallback code included); 1: the connection failed
 * (*why). */
int p11p_plane_run_pair(struct p11p_call *ci, struct p11p_call *c, const struct p11p_bound *b,
			unsigned nouts, int *why)
{
	struct ep *ep = b->ep;
	int64_t deadline = p11p_deadline(ep->timeout_ms);
	struct p11p_box *box;
	CK_RV rv;
	int fd;

	fd = ep_take(ep, &box, deadline);
	if (fd < 0) {
		*why = P11P_WHY_BROKEN;
		return 1;
	}
	rv = exchange(ep, fd, box, ci, c, deadline);
	if (rv == CKR_OK) {
		p11p_reply_parse(ci, 0);
		p11p_reply_parse(c, nouts);
	}
	if (rv != CKR_OK || ci->err || c->err)
		return failed(ep, fd, box, deadline, why);
	ep_give(ep, fd, box);
	return 0;
}

void p11p_plane_begin(struct p11p_call *c, unsigned long code, unsigned nargs)
{
	memset(c, 0, sizeof *c);
	p11p_codec_begin(c, code, nargs);
}

int p11p_ep_pairs(const struct ep *ep)
{
	return ep->pairs;
}

void p11p_eps_reset(int ours)
{
	while (eps != NULL) {
		struct ep *ep = eps;

		eps = ep->next;
		for (unsigned i = 0; i < ep->nidle; i++) {
			if (ours) {
				link_close(ep->idle[i], ep->idle_box[i]);
				continue;
			}
			if (ep->idle_box[i] != NULL)  /* the parent's: its word untouched */
				munmap(ep->idle_box[i], P11P_BOX_SIZE);
			close(ep->idle[i]);
		}
		free(ep);
	}
}
