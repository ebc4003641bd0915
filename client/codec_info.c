/* p11p client — codec for the information structures (CK_INFO, CK_SLOT_INFO,
 * CK_TOKEN_INFO, CK_MECHANISM_INFO, CK_SESSION_INFO): an array of the structure's
 * fields in protocol/README.md's order, each field a tagged offset. A reply is decoded
 * into a zeroed copy first, so the application's structure changes only when the whole
 * reply is valid. */
#include <stddef.h>
#include <string.h>

#include "codec.h"

enum field_kind { F_BIN, F_ULONG, F_VERSION };

struct field {
	enum field_kind kind;
	size_t offset;
	size_t size; /* for F_BIN: the exact size of the padded string */
};

#define BIN(T, m) { F_BIN, offsetof(T, m), sizeof(((T *)0)->m) }
#define ULONG(T, m) { F_ULONG, offsetof(T, m), 0 }
#define VERSION(T, m) { F_VERSION, offsetof(T, m), 0 }
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static const struct field info_fields[] = {
	VERSION(CK_INFO, cryptokiVersion), BIN(CK_INFO, manufacturerID), ULONG(CK_INFO, flags),
	BIN(CK_INFO, libraryDescription), VERSION(CK_INFO, libraryVersion),
};

static const struct field slot_info_fields[] = {
	BIN(CK_SLOT_INFO, slotDescription), BIN(CK_SLOT_INFO, manufacturerID),
	ULONG(CK_SLOT_INFO, flags), VERSION(CK_SLOT_INFO, hardwareVersion),
	VERSION(CK_SLOT_INFO, firmwareVersion),
};

static const struct field token_info_fields[] = {
	BIN(CK_TOKEN_INFO, label), BIN(CK_TOKEN_INFO, manufacturerID), BIN(CK_TOKEN_INFO, model),
	BIN(CK_TOKEN_INFO, serialNumber), ULONG(CK_TOKEN_INFO, flags),
	ULONG(CK_TOKEN_INFO, ulMaxSessionCount), ULONG(CK_TOKEN_INFO, ulSessionCount),
	ULONG(CK_TOKEN_INFO, ulMaxRwSessionCount), ULONG(CK_TOKEN_INFO, ulRwSessionCount),
	ULONG(CK_TOKEN_INFO, ulMaxPinLen), ULONG(CK_TOKEN_INFO, ulMinPinLen),
	ULONG(CK_TOKEN_INFO, ulTotalPublicMemory), ULONG(CK_TOKEN_INFO, ulFreePublicMemory),
	ULONG(CK_TOKEN_INFO, ulTotalPrivateMemory), ULONG(CK_TOKEN_INFO, ulFreePrivateMemory),
	VERSION(CK_TOKEN_INFO, hardwareVersion), VERSION(CK_TOKEN_INFO, firmwareVersion),
	BIN(CK_TOKEN_INFO, utcTime),
};

static const struct field mech_info_fields[] = {
	ULONG(CK_MECHANISM_INFO, ulMinKeySize), ULONG(CK_MECHANISM_INFO, ulMaxKeySize),
	ULONG(CK_MECHANISM_INFO, flags),
};

static const struct field session_info_fields[] = {
	ULONG(CK_SESSION_INFO, slotID), ULONG(CK_SESSION_INFO, state),
	ULONG(CK_SESSION_INFO, flags), ULONG(CK_SESSION_INFO, ulDeviceError),
};

static int get_version(const msgpack_object *o, CK_VERSION *v)
{
	CK_ULONG major, minor;

	if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != 2 ||
	    p11p_obj_ulong(&o->via.array.ptr[0], &major) != 0 ||
	    p11p_obj_ulong(&o->via.array.ptr[1], &minor) != 0 || major > 255 || minor > 255)
		return -1;
	v->major = (CK_BYTE)major;
	v->minor = (CK_BYTE)minor;
	return 0;
}

static int get_field(const struct field *f, const msgpack_object *o, unsigned char *base)
{
	CK_ULONG u;
	CK_VERSION v;

	switch (f->kind) {
	case F_BIN:
		if (o->type != MSGPACK_OBJECT_BIN || o->via.bin.size != f->size)
			return -1;
		memcpy(base + f->offset, o->via.bin.ptr, f->size);
		return 0;
	case F_ULONG:
		if (p11p_obj_ulong(o, &u) != 0)
			return -1;
		memcpy(base + f->offset, &u, sizeof u);
		return 0;
	case F_VERSION:
		if (get_version(o, &v) != 0)
			return -1;
		memcpy(base + f->offset, &v, sizeof v);
		return 0;
	}
	return -1;
}

static void get_struct(struct p11p_call *c, void *out, size_t size, const struct field *fields,
		       size_t nfields)
{
	union {
		CK_INFO info;
		CK_SLOT_INFO slot;
		CK_TOKEN_INFO token;
		CK_MECHANISM_INFO mech;
		CK_SESSION_INFO session;
	} tmp;
	const msgpack_object *o;

	if (c->err)
		return;
	o = p11p_next_out(c);
	if (c->rv != CKR_OK || out == NULL)
		return;
	if (o == NULL || o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size != nfields) {
		p11p_malformed(c);
		return;
	}
	memset(&tmp, 0, sizeof tmp);
	for (size_t i = 0; i < nfields; i++) {
		if (get_field(&fields[i], &o->via.array.ptr[i], (unsigned char *)&tmp) != 0) {
			p11p_malformed(c);
			return;
		}
	}
	memcpy(out, &tmp, size);
}

void p11p_get_out_info(struct p11p_call *c, CK_INFO_PTR p)
{
	get_struct(c, p, sizeof *p, info_fields, COUNT(info_fields));
}

void p11p_get_out_slot_info(struct p11p_call *c, CK_SLOT_INFO_PTR p)
{
	get_struct(c, p, sizeof *p, slot_info_fields, COUNT(slot_info_fields));
}

void p11p_get_out_token_info(struct p11p_call *c, CK_TOKEN_INFO_PTR p)
{
	get_struct(c, p, sizeof *p, token_info_fields, COUNT(token_info_fields));
}

void p11p_get_out_mech_info(struct p11p_call *c, CK_MECHANISM_INFO_PTR p)
{
	get_struct(c, p, sizeof *p, mech_info_fields, COUNT(mech_info_fields));
}

void p11p_get_out_session_info(struct p11p_call *c, CK_SESSION_INFO_PTR p)
{
	get_struct(c, p, sizeof *p, session_info_fields, COUNT(session_info_fields));
}
