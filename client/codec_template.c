/* p11p client — codec for templates: input templates ([type, value] per attribute) and
 * C_GetAttributeValue's in/out template ([type, cap] out, one value per attribute back),
 * both with nested templates (CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE,
 * CKA_DERIVE_TEMPLATE): arrays of attributes whose C length is count*sizeof(CK_ATTRIBUTE)
 * and whose wire length is the count. */
#include <string.h>

#include "codec.h"

/* A template-valued attribute: the three that PKCS#11 v2.40 defines. Other types with
 * the CKF_ARRAY_ATTRIBUTE bit (CKA_ALLOWED_MECHANISMS, vendor types) travel as bytes:
 * the client never reads an application's buffer as attributes unless the type says
 * it holds attributes. */
static int is_nested(CK_ATTRIBUTE_TYPE type)
{
	return type == CKA_WRAP_TEMPLATE || type == CKA_UNWRAP_TEMPLATE ||
	       type == CKA_DERIVE_TEMPLATE;
}

/* ---- input templates ---- */

static void put_attrs(struct p11p_call *c, const CK_ATTRIBUTE *t, CK_ULONG n, int depth);

static void put_attr(struct p11p_call *c, const CK_ATTRIBUTE *a, int depth)
{
	p11p_put_array(c, 2);
	p11p_put_ulong(c, a->type);
	if (is_nested(a->type) && a->pValue != NULL) {
		if (a->ulValueLen % sizeof(CK_ATTRIBUTE) != 0 || depth + 1 >= P11P_MAX_NESTING)
			p11p_fail(c, CKR_ATTRIBUTE_VALUE_INVALID);
		else
			put_attrs(c, a->pValue, a->ulValueLen / sizeof(CK_ATTRIBUTE), depth + 1);
	} else {
		p11p_put_bytes(c, a->pValue, a->ulValueLen);
	}
}

static void put_attrs(struct p11p_call *c, const CK_ATTRIBUTE *t, CK_ULONG n, int depth)
{
	p11p_put_array(c, n);
	for (CK_ULONG i = 0; i < n && !c->err; i++)
		put_attr(c, &t[i], depth);
}

/* An array of attributes; nil for (NULL, 0); the count for (NULL, count). */
void p11p_put_template(struct p11p_call *c, const CK_ATTRIBUTE *t, CK_ULONG n)
{
	if (t != NULL)
		put_attrs(c, t, n, 0);
	else if (n == 0)
		p11p_put_nil(c);
	else
		p11p_put_ulong(c, n);
}

/* ---- C_GetAttributeValue: the request ---- */

static void put_caps(struct p11p_call *c, const CK_ATTRIBUTE *t, CK_ULONG n, int depth)
{
	p11p_put_array(c, n);
	for (CK_ULONG i = 0; i < n && !c->err; i++) {
		const CK_ATTRIBUTE *a = &t[i];

		p11p_put_array(c, 2);
		p11p_put_ulong(c, a->type);
		if (a->pValue == NULL)
			p11p_put_nil(c); /* a length query */
		else if (!is_nested(a->type))
			p11p_put_ulong(c, a->ulValueLen);
		else if (depth + 1 >= P11P_MAX_NESTING)
			p11p_fail(c, CKR_ARGUMENTS_BAD);
		else
			put_caps(c, a->pValue, a->ulValueLen / sizeof(CK_ATTRIBUTE), depth + 1);
	}
}

void p11p_put_template_get(struct p11p_call *c, const CK_ATTRIBUTE *t, CK_ULONG n)
{
	if (t != NULL)
		put_caps(c, t, n, 0);
	else if (n == 0)
		p11p_put_nil(c);
	else
		p11p_put_ulong(c, n);
}

/* ---- C_GetAttributeValue: the reply ---- */

static int get_values(CK_ATTRIBUTE *t, CK_ULONG n, const msgpack_object *o, int depth);
static int get_inner(CK_ATTRIBUTE *t, CK_ULONG n, const msgpack_object *o, int depth);

/* One attribute's reply: bin (written), int (a length only, or CK_UNAVAILABLE_INFORMATION;
 * for a nested template a count), or an array (a nested template's inner [type, value]s). */
static int get_value(CK_ATTRIBUTE *a, const msgpack_object *v, int depth)
{
	CK_ULONG n;

	switch (v->type) {
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		if (p11p_obj_ulong(v, &n) != 0)
			return -1;
		if (is_nested(a->type) && n != CK_UNAVAILABLE_INFORMATION) {
			if (n > (CK_UNAVAILABLE_INFORMATION - 1) / sizeof(CK_ATTRIBUTE))
				return -1;
			n *= sizeof(CK_ATTRIBUTE);
		}
		a->ulValueLen = n;
		return 0;
	case MSGPACK_OBJECT_BIN:
		if (a->pValue == NULL || is_nested(a->type) || v->via.bin.size > a->ulValueLen)
			return -1;
		if (v->via.bin.size > 0)
			memcpy(a->pValue, v->via.bin.ptr, v->via.bin.size);
		a->ulValueLen = v->via.bin.size;
		return 0;
	case MSGPACK_OBJECT_ARRAY:
		/* the template the object holds may be shorter than the room given for it:
		 * its inner values come back, and ulValueLen says how many */
		if (a->pValue == NULL || !is_nested(a->type) || depth + 1 >= P11P_MAX_NESTING ||
		    v->via.array.size > a->ulValueLen / sizeof(CK_ATTRIBUTE))
			return -1;
		n = v->via.array.size;
		if (get_inner(a->pValue, n, v, depth + 1) != 0)
			return -1;
		a->ulValueLen = n * sizeof(CK_ATTRIBUTE);
		return 0;
	default:
		return -1;
	}
}

/* A nested template's inner attributes come back as [type, value] each: the module
 * writes the inner types too. The value is read by the type the application gave (the
 * one the request described), so a reply can never make the client take an
 * application's byte buffer for an array of attributes; the returned type is written
 * after. */
static int get_inner(CK_ATTRIBUTE *t, CK_ULONG n, const msgpack_object *o, int depth)
{
	for (CK_ULONG i = 0; i < n; i++) {
		const msgpack_object *pair = &o->via.array.ptr[i];
		CK_ULONG type;

		if (pair->type != MSGPACK_OBJECT_ARRAY || pair->via.array.size != 2 ||
		    p11p_obj_ulong(&pair->via.array.ptr[0], &type) != 0)
			return -1;
		if (get_value(&t[i], &pair->via.array.ptr[1], depth) != 0)
			return -1;
		t[i].type = type;
	}
	return 0;
}

static int get_values(CK_ATTRIBUTE *t, CK_ULONG n, const msgpack_object *o, int depth)
{
	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != n)
		return -1;
	for (CK_ULONG i = 0; i < n; i++) {
		if (get_value(&t[i], &o->via.array.ptr[i], depth) != 0)
			return -1;
	}
	return 0;
}

/* The values come back with CKR_OK and with the three per-attribute errors; each one
 * sets its ulValueLen and copies back what was written. */
void p11p_get_template_get(struct p11p_call *c, CK_ATTRIBUTE_PTR t, CK_ULONG n)
{
	const msgpack_object *o;

	if (c->err)
		return;
	o = p11p_next_out(c);
	if (c->rv != CKR_OK && c->rv != CKR_ATTRIBUTE_SENSITIVE &&
	    c->rv != CKR_ATTRIBUTE_TYPE_INVALID && c->rv != CKR_BUFFER_TOO_SMALL)
		return;
	if (t == NULL)
		return;
	if (o == NULL || get_values(t, n, o, 0) != 0)
		p11p_malformed(c);
}
