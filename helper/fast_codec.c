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

void p11p_fx_pack(struct p11p_fx *x, int ret)
{
	if (ret != 0)
		x->pack_failed = 1;
}

CK_BYTE p11p_fx_empty[1];

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

CK_ULONG p11p_fx_capacity(struct p11p_fx *x, const msgpack_object *o, size_t item)
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
		*p = o->via.bin.size ? (CK_BYTE_PTR)o->via.bin.ptr : p11p_fx_empty;
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
	*p = o->via.bin.size ? (const void *)o->via.bin.ptr : p11p_fx_empty;
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
		m->pParameter = param->via.bin.size ? (void *)param->via.bin.ptr : (void *)p11p_fx_empty;
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

/* ---- output kinds ---- */

/* nil: a length query (NULL buffer); int: a buffer of that capacity (0 is a real,
 * non-NULL, zero-length buffer). */
void p11p_fx_out_bytes(struct p11p_fx *x, const msgpack_object *o, struct p11p_fx_out_bytes *b)
{
	b->p = NULL;
	b->len = b->cap = 0;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	b->cap = b->len = p11p_fx_capacity(x, o, 1);
	if (!x->err)
		b->p = p11p_fx_alloc(x, b->cap);
}

void p11p_fx_put_out_bytes(struct p11p_fx *x, const struct p11p_fx_out_bytes *b)
{
	if (x->rv == CKR_OK && b->p != NULL) {
		CK_ULONG n = b->len <= b->cap ? b->len : b->cap;

		p11p_fx_pack(x, msgpack_pack_bin(&x->pk, (size_t)n));
		if (n > 0)
			p11p_fx_pack(x, msgpack_pack_bin_body(&x->pk, b->p, (size_t)n));
	} else if (x->rv == CKR_OK || x->rv == CKR_BUFFER_TOO_SMALL) {
		p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, b->len));
	} else {
		p11p_fx_pack(x, msgpack_pack_nil(&x->pk));
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
		p11p_fx_pack(x, msgpack_pack_bin(&x->pk, (size_t)b->len));
		if (b->len > 0)
			p11p_fx_pack(x, msgpack_pack_bin_body(&x->pk, b->p, (size_t)b->len));
	} else {
		p11p_fx_pack(x, msgpack_pack_nil(&x->pk));
	}
}

/* C_FindObjects: int: room for that many handles; nil: a NULL array. */
void p11p_fx_out_objects(struct p11p_fx *x, const msgpack_object *o, struct p11p_fx_out_objects *b)
{
	b->p = NULL;
	b->max = b->count = 0;
	if (x->err || o->type == MSGPACK_OBJECT_NIL)
		return;
	b->max = p11p_fx_capacity(x, o, sizeof(CK_OBJECT_HANDLE));
	if (!x->err)
		b->p = p11p_fx_alloc(x, (size_t)b->max * sizeof(CK_OBJECT_HANDLE));
}

void p11p_fx_put_out_objects(struct p11p_fx *x, const struct p11p_fx_out_objects *b)
{
	if (x->rv != CKR_OK || b->p == NULL) {
		p11p_fx_pack(x, msgpack_pack_nil(&x->pk));
		return;
	}
	CK_ULONG n = b->count <= b->max ? b->count : b->max;
	p11p_fx_pack(x, msgpack_pack_array(&x->pk, (size_t)n));
	for (CK_ULONG i = 0; i < n; i++)
		p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, b->p[i]));
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
		p11p_fx_pack(x, msgpack_pack_nil(&x->pk));
		return;
	}
	p11p_fx_pack(x, msgpack_pack_array(&x->pk, 4));
	p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, b->p->slotID));
	p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, b->p->state));
	p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, b->p->flags));
	p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, b->p->ulDeviceError));
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
	p11p_fx_pack(x, msgpack_pack_array(&x->pk, outputs ? 1 + nouts : 1));
	p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, rv));
	return outputs;
}

/* ---- one request ---- */

static void reply_rv(struct p11p_fx *x, CK_RV rv)
{
	p11p_fx_pack(x, msgpack_pack_array(&x->pk, 1));
	p11p_fx_pack(x, msgpack_pack_uint64(&x->pk, rv));
}

const uint8_t *p11p_fast_frame(const uint8_t *buf, size_t *pos, size_t have, uint32_t *size,
			       uint8_t *hint)
{
	const uint8_t *h = buf + *pos;

	if (*pos > have || have - *pos < 4)
		return NULL;
	*size = (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
	*hint = h[0];
	if (*size > have - *pos - 4)
		return NULL;
	*pos += 4 + *size;
	return h + 4;
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
