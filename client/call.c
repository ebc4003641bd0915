/* p11p client — the life of one call: codec on one side, link on the other. */
#include <string.h>

#include "call.h"
#include "gen/codes.h"
#include "link.h"

void p11p_call_start(struct p11p_call *c, unsigned long code, unsigned nargs)
{
	CK_RV rv;

	memset(c, 0, sizeof *c);
	rv = p11p_enter();
	if (rv != CKR_OK) {
		c->err = rv;
		return;
	}
	c->entered = 1;
	p11p_codec_begin(c, code, nargs);
}

void p11p_call_run(struct p11p_call *c, unsigned nouts)
{
	CK_RV rv;

	if (c->err)
		return;
	rv = p11p_roundtrip(c->code, c->req.data, c->req.size, &c->reply, &c->reply_len, &c->conn);
	if (rv == P11P_RV_NO_DAEMON) {
		c->offline = c->code == P11P_FN_C_GetSlotList;
		rv = CKR_DEVICE_ERROR;
	}
	if (rv != CKR_OK)
		p11p_fail(c, rv);
	else
		p11p_reply_parse(c, nouts);
}

CK_RV p11p_call_finish(struct p11p_call *c)
{
	CK_RV rv = c->offline ? CKR_OK : c->err != CKR_OK ? c->err : c->rv;

	if (c->conn != NULL)
		p11p_release(c->conn, !c->malformed);
	c->conn = NULL;
	p11p_codec_end(c);
	if (c->entered)
		p11p_leave();
	c->entered = 0;
	return rv;
}
