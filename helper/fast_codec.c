/* p11p helper — the data plane's codec: strict reading of one request with msgpack-c,
 * the per-kind decoders and encoders the generated functions (gen/fast_calls.c)
 * sequence, and the reply. See fast_codec.h; protocol/README.md for the encodings. */
#include <stdlib.h>
#include <string.h>

#include "fast_codec.h"
#include "p11p-prescan.h"

/* ---- one call's state ---- */

struct p11p_fx_block {
	struct p11p_fx_block *next;
	max_align_t data[];
};

void p11p_fx_malformed(struct p11p_fx *x)
{
	x->err = P11P_FX_MALFORMED;
}

void p11p_fx_refuse(struct p11p_fx *x, CK_RV rv)
{
	if (x->err == P11P_FX_FINE) {
		x->err = P11P_FX_REFUSED;
		x->rv = rv;
	}
}

void *p11p_fx_alloc(struct p11p_fx *x, size_t n)
{
	struct p11p_fx_block *b;

	if (n > SIZE_MAX - sizeof *b - 1 ||
	    (b = calloc(1, sizeof *b + (n ? n : 1))) == NULL) {
		p11p_fx_refuse(x, CKR_HOST_MEMORY);
		return NULL;
	}
	b->next = x->blocks;
	x->blocks = b;
	return b->data;
}

static void free_blocks(struct p11p_fx *x)
{
	while (x->blocks != NULL) {
		struct p11p_fx_block *b = x->blocks;

		x->blocks = b->next;
		free(b);
	}
}

static void pack(struct p11p_fx *x, int ret)
{
	if (ret != 0)
		x->pack_failed = 1;
}

/* An empty byte string as a real pointer: a zero-length bin is (non-NULL, 0) to the
 * module, as on the helper's pipe. Never written: only inputs point here. */
static CK_BYTE empty[1];

/* ---- input kinds ---- */

CK_ULONG p11p_fx_ulong(struct p11p_fx *x, const msgpack_object *o)
{
	if (x->err)
		return 0;
	if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > (uint64_t)(CK_ULONG)-1) {
		p11p_fx_malformed(x);
		return 0;
	}
	return (CK_ULONG)o->via.u64;
}

CK_BBOOL p11p_fx_bbool(struct p11p_fx *x, const msgpack_object *o)
{
	CK_ULONG v = p11p_fx_ulong(x, o);

	if (v > 1)
		p11p_fx_malformed(x);
	return v ? CK_TRUE : CK_FALSE;
}

/* An output capacity, lowered to what a reply can carry (helper/kinds.py capacity). */
static CK_ULONG capacity(struct p11p_fx *x, const msgpack_object *o, size_t item)
{
	CK_ULONG v = p11p_fx_ulong(x, o), most = x->io->max_output / item;

	return v < most ? v : most;
}

/* bin: (pointer, length); nil: (NULL, 0); int: (NULL, that length). */
void p11p_fx_bytes(struct p11p_fx *x, const msgpack_object *o, CK_BYTE_PTR *p, CK_ULONG *len)
{
	*p = NULL;
	*len = 0;
	if (x->err)
		return;
	if (o->type == MSGPACK_OBJECT_BIN) {
		*p = o->via.bin.size ? (CK_BYTE_PTR)o->via.bin.ptr : empty;
		*len = o->via.bin.size;
	} else if (o->type != MSGPACK_OBJECT_NIL) {
		*len = p11p_fx_ulong(x, o);
	}
}

void p11p_fx_field_bytes(struct p11p_fx *x, const msgpack_object *o, const void **p,
			 CK_ULONG *len)
{
	*p = NULL;
	*len = 0;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	if (o->type != MSGPACK_OBJECT_BIN) {
		p11p_fx_malformed(x);
		return;
	}
	*p = o->via.bin.size ? (const void *)o->via.bin.ptr : empty;
	*len = o->via.bin.size;
}

void p11p_fx_fixed(struct p11p_fx *x, const msgpack_object *o, void *field, size_t size)
{
	if (x->err)
		return;
	if (o->type != MSGPACK_OBJECT_BIN || o->via.bin.size != size) {
		p11p_fx_malformed(x);
		return;
	}
	memcpy(field, o->via.bin.ptr, size);
}

/* [type, param]: param nil (NULL), bin (plain bytes; refused for a mechanism whose
 * parameter is a structure: the module would follow pointers in those bytes), or the
 * fields of the structure of mechanisms.spec; nil for a NULL mechanism. */
CK_MECHANISM_PTR p11p_fx_mechanism(struct p11p_fx *x, const msgpack_object *o, CK_MECHANISM *m)
{
	const msgpack_object *param;

	memset(m, 0, sizeof *m);
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return NULL;
	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 2) {
		p11p_fx_malformed(x);
		return NULL;
	}
	m->mechanism = p11p_fx_ulong(x, &o->via.array.ptr[0]);
	param = &o->via.array.ptr[1];
	if (x->err)
		return NULL;
	switch (param->type) {
	case MSGPACK_OBJECT_NIL:
		break;
	case MSGPACK_OBJECT_BIN:
		if (p11p_structured_mechanism(m->mechanism)) {
			p11p_fx_refuse(x, CKR_MECHANISM_PARAM_INVALID);
			return NULL;
		}
		m->pParameter = param->via.bin.size ? (void *)param->via.bin.ptr : (void *)empty;
		m->ulParameterLen = param->via.bin.size;
		break;
	case MSGPACK_OBJECT_ARRAY:
		if (p11p_fx_mech_param(x, m, param) != 0)
			p11p_fx_malformed(x);
		break;
	default:
		p11p_fx_malformed(x);
	}
	return m;
}

/* ---- templates ---- */

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
			a->pValue = v->via.bin.size ? (void *)v->via.bin.ptr : (void *)empty;
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
		CK_ULONG n = capacity(x, cap, 1);
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
		pack(x, msgpack_pack_uint64(&x->pk, UINT64_MAX));
	} else if (cap->type == MSGPACK_OBJECT_NIL) {
		pack(x, msgpack_pack_uint64(&x->pk, is_nested(type) ? len / sizeof(CK_ATTRIBUTE) : len));
	} else if (is_nested(type)) {
		CK_ULONG count = len / sizeof(CK_ATTRIBUTE);
		const CK_ATTRIBUTE *inner = a->pValue;

		if (count > cap->via.array.size) {
			pack(x, msgpack_pack_uint64(&x->pk, count));
			return;
		}
		pack(x, msgpack_pack_array(&x->pk, (size_t)count));
		for (CK_ULONG j = 0; j < count; j++) {
			/* the module writes the inner types too: they travel with the values */
			pack(x, msgpack_pack_array(&x->pk, 2));
			pack(x, msgpack_pack_uint64(&x->pk, inner[j].type));
			put_value(x, &inner[j], &cap->via.array.ptr[j]);
		}
	} else {
		CK_ULONG room = cap->via.u64 < x->io->max_output ? (CK_ULONG)cap->via.u64
								 : x->io->max_output;

		if (len <= room) {
			pack(x, msgpack_pack_bin(&x->pk, (size_t)len));
			if (len > 0)
				pack(x, msgpack_pack_bin_body(&x->pk, a->pValue, (size_t)len));
		} else {
			pack(x, msgpack_pack_uint64(&x->pk, len));
		}
	}
}

/* The values mean something after CKR_OK and the three per-attribute errors. */
void p11p_fx_put_template_get(struct p11p_fx *x, const struct p11p_fx_get *g)
{
	if (g->req == NULL || (x->rv != CKR_OK && x->rv != CKR_ATTRIBUTE_SENSITIVE &&
			       x->rv != CKR_ATTRIBUTE_TYPE_INVALID && x->rv != CKR_BUFFER_TOO_SMALL)) {
		pack(x, msgpack_pack_nil(&x->pk));
		return;
	}
	pack(x, msgpack_pack_array(&x->pk, g->req->via.array.size));
	for (uint32_t i = 0; i < g->req->via.array.size; i++)
		put_value(x, &g->t[i], &g->req->via.array.ptr[i]);
}

/* ---- output kinds ---- */

/* nil: a length query (NULL buffer); int: a buffer of that capacity (0 is a real,
 * non-NULL, zero-length buffer). */
void p11p_fx_out_bytes(struct p11p_fx *x, const msgpack_object *o, struct p11p_fx_out_bytes *b)
{
	b->p = NULL;
	b->len = b->cap = 0;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	b->cap = b->len = capacity(x, o, 1);
	if (!x->err)
		b->p = p11p_fx_alloc(x, b->cap);
}

void p11p_fx_put_out_bytes(struct p11p_fx *x, const struct p11p_fx_out_bytes *b)
{
	if (x->rv == CKR_OK && b->p != NULL) {
		CK_ULONG n = b->len <= b->cap ? b->len : b->cap;

		pack(x, msgpack_pack_bin(&x->pk, (size_t)n));
		if (n > 0)
			pack(x, msgpack_pack_bin_body(&x->pk, b->p, (size_t)n));
	} else if (x->rv == CKR_OK || x->rv == CKR_BUFFER_TOO_SMALL) {
		pack(x, msgpack_pack_uint64(&x->pk, b->len));
	} else {
		pack(x, msgpack_pack_nil(&x->pk));
	}
}

/* int: that many random bytes (more than a reply can carry is CKR_HOST_MEMORY); nil:
 * NULL, 0. */
void p11p_fx_out_random(struct p11p_fx *x, const msgpack_object *o, struct p11p_fx_out_random *b)
{
	b->p = NULL;
	b->len = 0;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	b->len = p11p_fx_ulong(x, o);
	if (!x->err && b->len > x->io->max_output)
		p11p_fx_refuse(x, CKR_HOST_MEMORY);
	if (!x->err)
		b->p = p11p_fx_alloc(x, b->len);
}

void p11p_fx_put_out_random(struct p11p_fx *x, const struct p11p_fx_out_random *b)
{
	if (x->rv == CKR_OK && b->p != NULL) {
		pack(x, msgpack_pack_bin(&x->pk, (size_t)b->len));
		if (b->len > 0)
			pack(x, msgpack_pack_bin_body(&x->pk, b->p, (size_t)b->len));
	} else {
		pack(x, msgpack_pack_nil(&x->pk));
	}
}

/* C_FindObjects: int: room for that many handles; nil: a NULL array. */
void p11p_fx_out_objects(struct p11p_fx *x, const msgpack_object *o, struct p11p_fx_out_objects *b)
{
	b->p = NULL;
	b->max = b->count = 0;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	b->max = capacity(x, o, sizeof(CK_OBJECT_HANDLE));
	if (!x->err)
		b->p = p11p_fx_alloc(x, (size_t)b->max * sizeof(CK_OBJECT_HANDLE));
}

void p11p_fx_put_out_objects(struct p11p_fx *x, const struct p11p_fx_out_objects *b)
{
	if (x->rv != CKR_OK || b->p == NULL) {
		pack(x, msgpack_pack_nil(&x->pk));
		return;
	}
	CK_ULONG n = b->count <= b->max ? b->count : b->max;
	pack(x, msgpack_pack_array(&x->pk, (size_t)n));
	for (CK_ULONG i = 0; i < n; i++)
		pack(x, msgpack_pack_uint64(&x->pk, b->p[i]));
}

/* nil: NULL; 0: a zeroed structure for the module to fill. */
void p11p_fx_out_session_info(struct p11p_fx *x, const msgpack_object *o,
			      struct p11p_fx_out_session_info *b)
{
	b->p = NULL;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	if (p11p_fx_ulong(x, o) != 0)
		p11p_fx_malformed(x);
	if (!x->err)
		b->p = p11p_fx_alloc(x, sizeof *b->p);
}

void p11p_fx_put_out_session_info(struct p11p_fx *x, const struct p11p_fx_out_session_info *b)
{
	if (x->rv != CKR_OK || b->p == NULL) {
		pack(x, msgpack_pack_nil(&x->pk));
		return;
	}
	pack(x, msgpack_pack_array(&x->pk, 4));
	pack(x, msgpack_pack_uint64(&x->pk, b->p->slotID));
	pack(x, msgpack_pack_uint64(&x->pk, b->p->state));
	pack(x, msgpack_pack_uint64(&x->pk, b->p->flags));
	pack(x, msgpack_pack_uint64(&x->pk, b->p->ulDeviceError));
}

/* ---- the module's call ---- */

int p11p_fx_enter(struct p11p_fx *x, CK_SESSION_HANDLE *real)
{
	CK_RV rv;

	if (x->err)
		return 0;
	rv = x->io->enter(x->id, real, &x->slot);
	if (rv != CKR_OK) {
		p11p_fx_refuse(x, rv);
		return 0;
	}
	return 1;
}

int p11p_fx_returned(struct p11p_fx *x, unsigned nouts)
{
	CK_RV rv = x->rv;
	/* the codes after which some output means something (protocol/README.md, "Client
	 * link: calls"); after any other the outputs would all be nil: the error answer */
	int outputs = nouts > 0 && (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL ||
				    rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID);

	x->io->leave(x->id, x->slot);
	x->replied = 1;
	pack(x, msgpack_pack_array(&x->pk, outputs ? 1 + nouts : 1));
	pack(x, msgpack_pack_uint64(&x->pk, rv));
	return outputs;
}

/* ---- one request ---- */

static void reply_rv(struct p11p_fx *x, CK_RV rv)
{
	pack(x, msgpack_pack_array(&x->pk, 1));
	pack(x, msgpack_pack_uint64(&x->pk, rv));
}

int p11p_fast_serve(const struct p11p_fast_io *io, const char *body, size_t len,
		    msgpack_sbuffer *out)
{
	static const char header[4];
	struct p11p_fx x = { .io = io, .budget = 4 * io->max_output };
	const struct p11p_fast_fn *fn;
	const msgpack_object *r;
	msgpack_unpacked u;
	size_t off = 0;
	int ret = 0;

	msgpack_sbuffer_clear(out);
	if (msgpack_sbuffer_write(out, header, sizeof header) != 0)
		return -1;
	msgpack_packer_init(&x.pk, out, msgpack_sbuffer_write);
	if (p11p_prescan((const uint8_t *)body, len) != 0)
		return -1;
	msgpack_unpacked_init(&u);
	if (msgpack_unpack_next(&u, body, len, &off) != MSGPACK_UNPACK_SUCCESS || off != len) {
		msgpack_unpacked_destroy(&u);
		return -1;
	}
	r = &u.data;
	/* [code, id, arg...] */
	if (r->type != MSGPACK_OBJECT_ARRAY || r->via.array.size < 2 ||
	    r->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
	    r->via.array.ptr[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
		ret = -1;
		goto out;
	}
	fn = p11p_fast_function(r->via.array.ptr[0].via.u64);
	if (fn == NULL) {
		reply_rv(&x, CKR_FUNCTION_NOT_SUPPORTED);
		goto out;
	}
	if (r->via.array.size != 2u + fn->nargs) {
		ret = -1;
		goto out;
	}
	x.id = r->via.array.ptr[1].via.u64;
	fn->run(&x, r->via.array.ptr + 2);
	if (x.err == P11P_FX_MALFORMED)
		ret = -1;
	else if (!x.replied)
		reply_rv(&x, x.rv);
out:
	free_blocks(&x);
	msgpack_unpacked_destroy(&u);
	return ret == 0 && x.pack_failed ? -1 : ret;
}
