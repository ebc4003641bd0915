/* p11p client — the codec: Cryptoki arguments to a msgpack request, a msgpack reply back
 * to Cryptoki outputs. One put/get pair per argument kind of protocol/README.md; the
 * generated stubs (gen/stubs.c) only sequence them. Works on buffers, never on a socket.
 *
 * Every helper is a no-op once c->err is set, so a stub calls them in a row and checks
 * once at the end (p11p_call_finish). A reply that breaks the protocol sets
 * c->err = CKR_DEVICE_ERROR; an application argument that cannot be sent sets the
 * Cryptoki error for it (CKR_ARGUMENTS_BAD, CKR_MECHANISM_PARAM_INVALID, ...). */
#ifndef P11P_CODEC_H
#define P11P_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#include "p11p-extra.h"

/* Largest reply frame body the client accepts (protocol/README.md, Framing). */
#define P11P_MAX_REPLY (64u * 1024u * 1024u)
/* Size of the frame header reserved at the start of every request buffer. */
#define P11P_FRAME_HEADER 4u
/* How deep templates may nest (a nested template inside a nested template ...). */
#define P11P_MAX_NESTING 4

struct p11p_call {
	CK_RV err;                  /* first local failure; CKR_OK while all is well */
	unsigned long code;         /* the function code */
	int entered;                /* counted in flight (p11p_enter), to leave at the end */
	int buffers;                /* req is initialised */
	msgpack_sbuffer req;        /* frame header (4 bytes), then the request */
	msgpack_packer pk;
	char *reply;                /* the reply frame body, owned */
	size_t reply_len;
	msgpack_unpacked unpacked;  /* the decoded reply, owned */
	int parsed;
	CK_RV rv;                   /* the rv in the reply */
	const msgpack_object *outs; /* the reply's outputs */
	uint32_t nouts, next;
	int malformed;              /* the reply broke the protocol */
	void *conn;                 /* the connection, held while the reply is decoded */
	int offline;                /* C_GetSlotList without a daemon: no slot, CKR_OK */
	int secret;                 /* the request carries a PIN: wiped at the end */
};

/* ---- buffers and reply parsing (codec.c) ---- */
void p11p_codec_begin(struct p11p_call *c, unsigned long code, unsigned nargs);
void p11p_codec_end(struct p11p_call *c);
/* A request that carries a PIN (an argument of kind pin: p11p_put_pin) is wiped
 * (p11p_codec_end does it before it frees the buffer; one enlarged on the way, for a
 * PIN of kilobytes, leaves its earlier copy to the allocator). */
void p11p_codec_wipe(struct p11p_call *c);
/* Strictly parses one msgpack object spanning exactly [buf, buf+len). 0 or -1. */
int p11p_msgpack_parse(const char *buf, size_t len, msgpack_unpacked *out);
/* Parses c->reply as [rv, out...] with 0 or nouts outputs; sets c->err on failure. */
void p11p_reply_parse(struct p11p_call *c, unsigned nouts);
/* The next output of the reply, or NULL when it is nil or missing. */
const msgpack_object *p11p_next_out(struct p11p_call *c);
/* A msgpack unsigned integer as a CK_ULONG (2**64-1 is CK_UNAVAILABLE_INFORMATION). */
int p11p_obj_ulong(const msgpack_object *o, CK_ULONG *v);
void p11p_fail(struct p11p_call *c, CK_RV rv);
/* The reply broke the protocol: CKR_DEVICE_ERROR, and its connection is dropped. */
void p11p_malformed(struct p11p_call *c);

/* ---- primitives ---- */
void p11p_put_nil(struct p11p_call *c);
void p11p_put_array(struct p11p_call *c, size_t n);
void p11p_put_bin(struct p11p_call *c, const void *p, size_t len);

/* ---- input kinds ---- */
void p11p_put_ulong(struct p11p_call *c, CK_ULONG v);             /* ulong slot session object */
void p11p_put_bbool(struct p11p_call *c, CK_BBOOL v);
void p11p_put_bytes(struct p11p_call *c, const void *p, CK_ULONG len);   /* bytes */
/* pin: as bytes, and the request is wiped before its buffer is freed (p11p_codec_end) */
void p11p_put_pin(struct p11p_call *c, const CK_UTF8CHAR *p, CK_ULONG len);
void p11p_put_label32(struct p11p_call *c, const CK_UTF8CHAR *p);
void p11p_put_fixed(struct p11p_call *c, const void *p, size_t len);    /* fixed16/fixed8 */
void p11p_put_template(struct p11p_call *c, const CK_ATTRIBUTE *t, CK_ULONG n);
void p11p_put_mechanism(struct p11p_call *c, const CK_MECHANISM *m);

/* ---- output kinds: the request element, then the reply element ---- */
void p11p_put_out_bytes(struct p11p_call *c, CK_BYTE_PTR p, CK_ULONG_PTR plen);
void p11p_get_out_bytes(struct p11p_call *c, CK_BYTE_PTR p, CK_ULONG_PTR plen);
void p11p_put_out_random(struct p11p_call *c, CK_BYTE_PTR p, CK_ULONG len);
void p11p_get_out_random(struct p11p_call *c, CK_BYTE_PTR p, CK_ULONG len);
void p11p_put_out_ulong(struct p11p_call *c, CK_ULONG_PTR p);     /* out_ulong/slot/session/object */
void p11p_get_out_ulong(struct p11p_call *c, CK_ULONG_PTR p);
void p11p_put_out_ulongs(struct p11p_call *c, CK_ULONG_PTR list, CK_ULONG_PTR pcount); /* slots, mechs */
void p11p_get_out_ulongs(struct p11p_call *c, CK_ULONG_PTR list, CK_ULONG_PTR pcount);
void p11p_put_out_objects(struct p11p_call *c, CK_OBJECT_HANDLE_PTR p, CK_ULONG max, CK_ULONG_PTR pcount);
void p11p_get_out_objects(struct p11p_call *c, CK_OBJECT_HANDLE_PTR p, CK_ULONG max, CK_ULONG_PTR pcount);
void p11p_put_out_struct(struct p11p_call *c, const void *p);     /* the five out_*info kinds */
void p11p_get_out_info(struct p11p_call *c, CK_INFO_PTR p);
void p11p_get_out_slot_info(struct p11p_call *c, CK_SLOT_INFO_PTR p);
void p11p_get_out_token_info(struct p11p_call *c, CK_TOKEN_INFO_PTR p);
void p11p_get_out_mech_info(struct p11p_call *c, CK_MECHANISM_INFO_PTR p);
void p11p_get_out_session_info(struct p11p_call *c, CK_SESSION_INFO_PTR p);
void p11p_put_template_get(struct p11p_call *c, const CK_ATTRIBUTE *t, CK_ULONG n);
void p11p_get_template_get(struct p11p_call *c, CK_ATTRIBUTE_PTR t, CK_ULONG n);

/* ---- structured mechanism parameters (tables generated into gen/mech_params.c) ---- */
struct p11p_mech_param {
	CK_MECHANISM_TYPE type;
	size_t size;                                  /* sizeof the C structure */
	void (*put)(struct p11p_call *c, const void *param);
	int objects;                                  /* a field names an object handle */
};
extern const struct p11p_mech_param p11p_mech_params[];
extern const size_t p11p_mech_params_count;
void p11p_put_field_bytes(struct p11p_call *c, const void *p, CK_ULONG len);
/* Whether a mechanism's structured parameter names an object handle (a virtual handle
 * the daemon maps: such a mechanism never goes on the data plane). */
int p11p_mech_names_object(CK_MECHANISM_TYPE type);
/* An element already encoded (a recorded request element sent again). */
void p11p_put_raw(struct p11p_call *c, const void *p, size_t len);

#endif
