/* p11p client tests — the fake link (see fake_link.h). */
#include <stdlib.h>
#include <string.h>

#include "fake_link.h"
#include "mptext.h"
#include "sessions.h"

int fake_initialized = 1;
CK_RV fake_transport_rv = CKR_OK;
msgpack_sbuffer fake_reply;
char fake_request[16384];
unsigned fake_roundtrips;
long fake_in_flight;

CK_RV p11p_enter(void)
{
	if (!fake_initialized)
		return CKR_CRYPTOKI_NOT_INITIALIZED;
	fake_in_flight++;
	return CKR_OK;
}

void p11p_leave(void)
{
	fake_in_flight--;
}

static int fake_connection;
int fake_released_healthy = -1;

void p11p_release(void *conn, int healthy)
{
	if (conn == &fake_connection)
		fake_released_healthy = healthy;
}

CK_RV p11p_roundtrip(unsigned long code, char *frame, size_t len, char **reply,
		     size_t *reply_len, void **conn)
{
	msgpack_unpacked u;
	size_t off = 0;

	(void)code;
	fake_roundtrips++;
	msgpack_unpacked_init(&u);
	if (len >= 4 && msgpack_unpack_next(&u, frame + 4, len - 4, &off) == MSGPACK_UNPACK_SUCCESS &&
	    off == len - 4)
		mp_to_text(&u.data, fake_request, sizeof fake_request);
	else
		strcpy(fake_request, "<undecodable request>");
	msgpack_unpacked_destroy(&u);
	if (fake_transport_rv != CKR_OK)
		return fake_transport_rv;
	*reply = malloc(fake_reply.size ? fake_reply.size : 1);
	if (*reply == NULL)
		return CKR_HOST_MEMORY;
	if (fake_reply.size)
		memcpy(*reply, fake_reply.data, fake_reply.size);
	*reply_len = fake_reply.size;
	*conn = &fake_connection;
	return CKR_OK;
}

/* No data plane here (client/direct.c and plane_*.c are not linked): nothing to hand over
 * before a call of the daemon's. */
void p11p_plane_settle(CK_SESSION_HANDLE h)
{
	(void)h;
}

/* No sessions of the library's here (client/sessions.c is not linked): a session
 * argument is put as it is. */
void p11p_put_session(struct p11p_call *c, CK_SESSION_HANDLE h)
{
	p11p_put_ulong(c, h);
}
