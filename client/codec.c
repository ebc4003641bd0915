/* p11p client — codec core: request buffers, strict reply parsing, and the scalar,
 * byte-string and list kinds. Templates, mechanisms and info structures have their own
 * files. See codec.h for the conventions; protocol/README.md for the encodings. */
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "p11p-prescan.h"

void p11p_fail(struct p11p_call *c, CK_RV rv)
{
	if (c->err == CKR_OK)
		c->err = rv;
}

void p11p_malformed(struct p11p_call *c)
{
	if (c->err == CKR_OK) {
		c->err = CKR_DEVICE_ERROR;
		c->malformed = 1;
	}
}

static void check_pack(struct p11p_call *c, int ret)
{
	if (ret != 0)
		p11p_fail(c, CKR_HOST_MEMORY);
}

void p11p_codec_begin(struct p11p_call *c, unsigned long code, unsigned nargs)
{
	static const char header[P11P_FRAME_HEADER];

	c->code = code;
	msgpack_sbuffer_init(&c->req);
	c->buffers = 1;
	msgpack_packer_init(&c->pk, &c->req, msgpack_sbuffer_write);
	check_pack(c, msgpack_sbuffer_write(&c->req, header, sizeof header));
	p11p_put_array(c, 1u + nargs);
	p11p_put_ulong(c, code);
}

void p11p_codec_wipe(struct p11p_call *c)
{
	if (c->buffers && c->req.data != NULL && c->secret)
		explicit_bzero(c->req.data, c->req.alloc);
}

void p11p_codec_end(struct p11p_call *c)
{
	p11p_codec_wipe(c);
	if (c->buffers)
		msgpack_sbuffer_destroy(&c->req);
	c->buffers = 0;
	if (c->parsed)
		msgpack_unpacked_destroy(&c->unpacked);
	c->parsed = 0;
	free(c->reply);
	c->reply = NULL;
}

/* ---- strict parsing ---- */

int p11p_msgpack_parse(const char *buf, size_t len, msgpack_unpacked *out)
{
	size_t off = 0;

	if (buf == NULL || p11p_prescan((const uint8_t *)buf, len) != 0)
		return -1;
	msgpack_unpacked_init(out);
	if (msgpack_unpack_next(out, buf, len, &off) != MSGPACK_UNPACK_SUCCESS || off != len) {
		msgpack_unpacked_destroy(out);
		return -1;
	}
	return 0;
}

int p11p_obj_ulong(const msgpack_object *o, CK_ULONG *v)
{
	if (o == NULL || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
		return -1;
	if (o->via.u64 == UINT64_MAX) {
		*v = CK_UNAVAILABLE_INFORMATION;
		return 0;
	}
	if (o->via.u64 > (uint64_t)(CK_ULONG)-1)
		return -1;
	*v = (CK_ULONG)o->via.u64;
	return 0;
}

void p11p_reply_parse(struct p11p_call *c, unsigned nouts)
{
	const msgpack_object *r;

	if (c->err)
		return;
	if (p11p_msgpack_parse(c->reply, c->reply_len, &c->unpacked) != 0) {
		p11p_malformed(c);
		return;
	}
	c->parsed = 1;
	r = &c->unpacked.data;
	if (r->type != MSGPACK_OBJECT_ARRAY ||
	    (r->via.array.size != 1 && r->via.array.size != 1u + nouts) ||
	    p11p_obj_ulong(&r->via.array.ptr[0], &c->rv) != 0) {
		p11p_malformed(c);
		return;
	}
	c->outs = r->via.array.ptr + 1;
	c->nouts = r->via.array.size - 1;
	c->next = 0;
}

const msgpack_object *p11p_next_out(struct p11p_call *c)
{
	const msgpack_object *o;

	if (c->next >= c->nouts) {
		c->next++;
		return NULL;
	}
	o = &c->outs[c->next++];
	return o->type == MSGPACK_OBJECT_NIL ? NULL : o;
}

/* ---- primitives ---- */

void p11p_put_raw(struct p11p_call *c, const void *p, size_t len)
{
	if (!c->err && len > 0)
		check_pack(c, msgpack_sbuffer_write(&c->req, p, len));
}

void p11p_put_nil(struct p11p_call *c)
{
	if (!c->err)
		check_pack(c, msgpack_pack_nil(&c->pk));
}

void p11p_put_array(struct p11p_call *c, size_t n)
{
	if (c->err)
		return;
	if (n > UINT32_MAX)
		p11p_fail(c, CKR_ARGUMENTS_BAD);
	else
		check_pack(c, msgpack_pack_array(&c->pk, n));
}

void p11p_put_bin(struct p11p_call *c, const void *p, size_t len)
{
	if (c->err)
		return;
	if (len > UINT32_MAX) {
		p11p_fail(c, CKR_ARGUMENTS_BAD);
		return;
	}
	check_pack(c, msgpack_pack_bin(&c->pk, len));
	if (!c->err && len > 0)
		check_pack(c, msgpack_pack_bin_body(&c->pk, p, len));
}

/* ---- input kinds ---- */

void p11p_put_ulong(struct p11p_call *c, CK_ULONG v)
{
	if (!c->err)
		check_pack(c, msgpack_pack_uint64(&c->pk, (uint64_t)v));
}

void p11p_put_bbool(struct p11p_call *c, CK_BBOOL v)
{
	p11p_put_ulong(c, v ? 1 : 0);
}

/* bin for a buffer; nil for (NULL, 0); the length for (NULL, len), so the module sees
 * exactly what the application passed. */
void p11p_put_bytes(struct p11p_call *c, const void *p, CK_ULONG len)
{
	if (p != NULL)
		p11p_put_bin(c, p, len);
	else if (len == 0)
		p11p_put_nil(c);
	else
		p11p_put_ulong(c, len);
}

void p11p_put_pin(struct p11p_call *c, const CK_UTF8CHAR *p, CK_ULONG len)
{
	c->secret = 1;
	p11p_put_bytes(c, p, len);
}

void p11p_put_label32(struct p11p_call *c, const CK_UTF8CHAR *p)
{
	if (p == NULL)
		p11p_put_nil(c);
	else
		p11p_put_bin(c, p, 32);
}

void p11p_put_fixed(struct p11p_call *c, const void *p, size_t len)
{
	p11p_put_bin(c, p, len);
}

/* A pointer+length field of a mechanism parameter: bin, or nil for NULL. */
void p11p_put_field_bytes(struct p11p_call *c, const void *p, CK_ULONG len)
{
	if (p == NULL)
		p11p_put_nil(c);
	else
		p11p_put_bin(c, p, len);
}

/* ---- out_bytes: nil for a length query, else the capacity ---- */

void p11p_put_out_bytes(struct p11p_call *c, CK_BYTE_PTR p, CK_ULONG_PTR plen)
{
	if (plen == NULL)
		p11p_fail(c, CKR_ARGUMENTS_BAD);
	else if (p == NULL)
		p11p_put_nil(c);
	else
		p11p_put_ulong(c, *plen);
}

void p11p_get_out_bytes(struct p11p_call *c, CK_BYTE_PTR p, CK_ULONG_PTR plen)
{
	const msgpack_object *o;
	CK_ULONG n;

	if (c->err)
		return;
	o = p11p_next_out(c);
	if (c->rv == CKR_OK && p != NULL) {
		if (o == NULL || o->type != MSGPACK_OBJECT_BIN || o->via.bin.size > *plen) {
			p11p_malformed(c);
			return;
		}
		if (o->via.bin.size > 0)
			memcpy(p, o->via.bin.ptr, o->via.bin.size);
		*plen = o->via.bin.size;
	} else if (c->rv == CKR_OK || c->rv == CKR_BUFFER_TOO_SMALL) {
		if (p11p_obj_ulong(o, &n) != 0) {
			p11p_malformed(c);
			return;
		}
		*plen = n;
	}
}

/* ---- out_random: the length to fill, or nil for NULL ---- */

void p11p_put_out_random(struct p11p_call *c, CK_BYTE_PTR p, CK_ULONG len)
{
	if (p == NULL)
		p11p_put_nil(c);
	else
		p11p_put_ulong(c, len);
}

void p11p_get_out_random(struct p11p_call *c, CK_BYTE_PTR p, CK_ULONG len)
{
	const msgpack_object *o;

	if (c->err)
		return;
	o = p11p_next_out(c);
	if (c->rv != CKR_OK || p == NULL)
		return;
	if (o == NULL || o->type != MSGPACK_OBJECT_BIN || o->via.bin.size != len) {
		p11p_malformed(c);
		return;
	}
	if (len > 0)
		memcpy(p, o->via.bin.ptr, len);
}

/* ---- out_ulong, out_slot, out_session, out_object ---- */

void p11p_put_out_ulong(struct p11p_call *c, CK_ULONG_PTR p)
{
	if (p == NULL)
		p11p_put_nil(c);
	else
		p11p_put_ulong(c, 0);
}

void p11p_get_out_ulong(struct p11p_call *c, CK_ULONG_PTR p)
{
	const msgpack_object *o;
	CK_ULONG v;

	if (c->err)
		return;
	o = p11p_next_out(c);
	if (c->rv != CKR_OK || p == NULL)
		return;
	if (p11p_obj_ulong(o, &v) != 0)
		p11p_malformed(c);
	else
		*p = v;
}

/* ---- out_slots, out_mechs: a list of CK_ULONG with its count ---- */

void p11p_put_out_ulongs(struct p11p_call *c, CK_ULONG_PTR list, CK_ULONG_PTR pcount)
{
	p11p_put_out_bytes(c, (CK_BYTE_PTR)list, pcount);
}

/* Copies an array of integers into list (capacity cap); its size into *pcount. */
static void get_ulong_array(struct p11p_call *c, const msgpack_object *o, CK_ULONG_PTR list,
			    CK_ULONG cap, CK_ULONG_PTR pcount)
{
	if (o == NULL || o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size > cap) {
		p11p_malformed(c);
		return;
	}
	for (uint32_t i = 0; i < o->via.array.size; i++) {
		if (p11p_obj_ulong(&o->via.array.ptr[i], &list[i]) != 0) {
			p11p_malformed(c);
			return;
		}
	}
	*pcount = o->via.array.size;
}

void p11p_get_out_ulongs(struct p11p_call *c, CK_ULONG_PTR list, CK_ULONG_PTR pcount)
{
	const msgpack_object *o;
	CK_ULONG n;

	if (c->offline) {
		*pcount = 0;
		return;
	}
	if (c->err)
		return;
	o = p11p_next_out(c);
	if (c->rv == CKR_OK && list != NULL) {
		get_ulong_array(c, o, list, *pcount, pcount);
	} else if (c->rv == CKR_OK || c->rv == CKR_BUFFER_TOO_SMALL) {
		if (p11p_obj_ulong(o, &n) != 0)
			p11p_malformed(c);
		else
			*pcount = n;
	}
}

/* ---- out_objects: up to max handles ---- */

void p11p_put_out_objects(struct p11p_call *c, CK_OBJECT_HANDLE_PTR p, CK_ULONG max,
			  CK_ULONG_PTR pcount)
{
	if (pcount == NULL)
		p11p_fail(c, CKR_ARGUMENTS_BAD);
	else if (p == NULL)
		p11p_put_nil(c);
	else
		p11p_put_ulong(c, max);
}

void p11p_get_out_objects(struct p11p_call *c, CK_OBJECT_HANDLE_PTR p, CK_ULONG max,
			  CK_ULONG_PTR pcount)
{
	const msgpack_object *o;

	if (c->err)
		return;
	o = p11p_next_out(c);
	if (c->rv != CKR_OK)
		return;
	if (p != NULL) {
		get_ulong_array(c, o, p, max, pcount);
	} else if (o != NULL) {
		/* NULL array: nothing can have been written */
		if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 0)
			p11p_malformed(c);
		else
			*pcount = 0;
	}
}

/* ---- the five info structures: nil for NULL, else 0 ---- */

void p11p_put_out_struct(struct p11p_call *c, const void *p)
{
	if (p == NULL)
		p11p_put_nil(c);
	else
		p11p_put_ulong(c, 0);
}
