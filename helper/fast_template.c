/* p11p helper — the data plane's codec for templates (fast_codec.h): an attribute
 * template read into CK_ATTRIBUTEs (values, nested templates of CKA_WRAP_TEMPLATE and its
 * kin), a C_GetAttributeValue template read as capacities, and its values written into
 * the reply, as protocol/README.md "Argument kinds" encodes them. */
#include <stdlib.h>
#include <string.h>

#include "fast_codec.h"

static int is_nested(CK_ATTRIBUTE_TYPE type)
{
	return type == CKA_WRAP_TEMPLATE || type == CKA_UNWRAP_TEMPLATE ||
	       type == CKA_DERIVE_TEMPLATE;
}

/* [type, pair] at o, checked; the pair's second element, or NULL. */
static const msgpack_object *pair(struct p11p_fx *x, const msgpack_object *o,
				  CK_ATTRIBUTE_TYPE *type)
{
	if (x->err)
		return NULL;
	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 2) {
		p11p_fx_malformed(x);
		return NULL;
	}
	*type = p11p_fx_ulong(x, &o->via.array.ptr[0]);
	return x->err ? NULL : &o->via.array.ptr[1];
}

static CK_ATTRIBUTE_PTR attributes(struct p11p_fx *x, const msgpack_object *o, int depth)
{
	CK_ATTRIBUTE_PTR t;

	if (o->type != MSGPACK_OBJECT_ARRAY) {
		p11p_fx_malformed(x);
		return NULL;
	}
	t = p11p_fx_alloc(x, (size_t)o->via.array.size * sizeof *t);
	for (uint32_t i = 0; t != NULL && i < o->via.array.size && !x->err; i++) {
		CK_ATTRIBUTE *a = &t[i];
		const msgpack_object *v = pair(x, &o->via.array.ptr[i], &a->type);

		if (v == NULL)
			break;
		if (v->type == MSGPACK_OBJECT_BIN && !is_nested(a->type)) {
			a->pValue = v->via.bin.size ? (void *)v->via.bin.ptr : (void *)p11p_fx_empty;
			a->ulValueLen = v->via.bin.size;
		} else if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
			/* NULL with a length: the module would read through it (the daemon's
			 * shapes.unsafe_arguments refuses it alike) */
			if (p11p_fx_ulong(x, v) != 0)
				p11p_fx_refuse(x, CKR_ATTRIBUTE_VALUE_INVALID);
		} else if (v->type == MSGPACK_OBJECT_ARRAY && is_nested(a->type) &&
			   depth + 1 < P11P_FAST_MAX_NESTING) {
			a->pValue = attributes(x, v, depth + 1);
			a->ulValueLen = (CK_ULONG)v->via.array.size * sizeof(CK_ATTRIBUTE);
		} else if (v->type != MSGPACK_OBJECT_NIL) {
			p11p_fx_malformed(x);
		}
	}
	return x->err ? NULL : t;
}

/* array: (attributes, count); nil: (NULL, 0); int: (NULL, that count). */
void p11p_fx_template(struct p11p_fx *x, const msgpack_object *o, CK_ATTRIBUTE_PTR *t,
		      CK_ULONG *n)
{
	*t = NULL;
	*n = 0;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	if (o->type == MSGPACK_OBJECT_ARRAY) {
		*t = attributes(x, o, 0);
		*n = o->via.array.size;
	} else {
		*n = p11p_fx_ulong(x, o);
	}
}

/* C_GetAttributeValue's request: [type, cap] per attribute, cap nil (a length query),
 * an int (a buffer of that capacity), or for a template attribute an array of the
 * same (its inner attributes). */
static CK_ATTRIBUTE_PTR caps(struct p11p_fx *x, const msgpack_object *o, int depth)
{
	CK_ATTRIBUTE_PTR t;

	if (o->type != MSGPACK_OBJECT_ARRAY) {
		p11p_fx_malformed(x);
		return NULL;
	}
	t = p11p_fx_alloc(x, (size_t)o->via.array.size * sizeof *t);
	for (uint32_t i = 0; t != NULL && i < o->via.array.size && !x->err; i++) {
		CK_ATTRIBUTE *a = &t[i];
		const msgpack_object *cap = pair(x, &o->via.array.ptr[i], &a->type);

		if (cap == NULL || cap->type == MSGPACK_OBJECT_NIL)
			continue;
		if (is_nested(a->type)) {
			if (cap->type != MSGPACK_OBJECT_ARRAY || depth + 1 >= P11P_FAST_MAX_NESTING) {
				p11p_fx_malformed(x);
				break;
			}
			a->pValue = caps(x, cap, depth + 1);
			a->ulValueLen = (CK_ULONG)cap->via.array.size * sizeof(CK_ATTRIBUTE);
			continue;
		}
		CK_ULONG n = p11p_fx_capacity(x, cap, 1);
		if (x->err)
			break;
		if (n > x->budget) {
			p11p_fx_refuse(x, CKR_HOST_MEMORY); /* could not travel back in one frame */
			break;
		}
		x->budget -= n;
		a->pValue = p11p_fx_alloc(x, n);
		a->ulValueLen = n;
	}
	return x->err ? NULL : t;
}

void p11p_fx_template_get(struct p11p_fx *x, const msgpack_object *o, struct p11p_fx_get *g)
{
	g->t = NULL;
	g->n = 0;
	g->req = NULL;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	if (o->type == MSGPACK_OBJECT_ARRAY) {
		g->t = caps(x, o, 0);
		g->n = o->via.array.size;
		g->req = o;
	} else {
		g->n = p11p_fx_ulong(x, o);
	}
}

/* One attribute's value as the module left it, by the request's item [type, cap]: bin
 * (written and within the room), an int (the length: of a query, of a value that did
 * not fit, 2**64-1 for CK_UNAVAILABLE_INFORMATION; a count for a template attribute),
 * or for a template attribute with room the inner [type, value]s. */
static void put_value(struct p11p_fx *x, const CK_ATTRIBUTE *a, const msgpack_object *item)
{
	CK_ATTRIBUTE_TYPE type = (CK_ATTRIBUTE_TYPE)item->via.array.ptr[0].via.u64;
	const msgpack_object *cap = &item->via.array.ptr[1];
	CK_ULONG len = a->ulValueLen;

	if (len == CK_UNAVAILABLE_INFORMATION) {
		p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, UINT64_MAX));
	} else if (cap->type == MSGPACK_OBJECT_NIL) {
		p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, is_nested(type) ? len / sizeof(CK_ATTRIBUTE) : len));
	} else if (is_nested(type)) {
		CK_ULONG count = len / sizeof(CK_ATTRIBUTE);
		const CK_ATTRIBUTE *inner = a->pValue;

		if (count > cap->via.array.size) {
			p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, count));
			return;
		}
		p11p_fx_pack(x, msgpack_pack_array(&x->pk, (size_t)count));
		for (CK_ULONG j = 0; j < count; j++) {
			/* the module writes the inner types too: they travel with the values */
			p11p_fx_pack(x, msgpack_pack_array(&x->pk, 2));
			p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, inner[j].type));
			put_value(x, &inner[j], &cap->via.array.ptr[j]);
		}
	} else {
		CK_ULONG room = cap->via.u64 < x->io->max_output ? (CK_ULONG)cap->via.u64
								 : x->io->max_output;

		if (len <= room) {
			p11p_fx_pack(x, msgpack_pack_bin(&x->pk, (size_t)len));
			if (len > 0)
				p11p_fx_pack(x, msgpack_pack_bin_body(&x->pk, a->pValue, (size_t)len));
		} else {
			p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, len));
		}
	}
}

/* The values mean something after CKR_OK and the three per-attribute errors. */
void p11p_fx_put_template_get(struct p11p_fx *x, const struct p11p_fx_get *g)
{
	if (g->req == NULL || (x->rv != CKR_OK && x->rv != CKR_ATTRIBUTE_SENSITIVE &&
			       x->rv != CKR_ATTRIBUTE_TYPE_INVALID && x->rv != CKR_BUFFER_TOO_SMALL)) {
		p11p_fx_pack(x, msgpack_pack_nil(&x->pk));
		return;
	}
	p11p_fx_pack(x, msgpack_pack_array(&x->pk, g->req->via.array.size));
	for (uint32_t i = 0; i < g->req->via.array.size; i++)
		put_value(x, &g->t[i], &g->req->via.array.ptr[i]);
}
