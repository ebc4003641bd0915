/* p11p client — the hello on a new connection to the daemon: what the library offers
 * (versions, features, its context, and what kept.c keeps for a restarted daemon), and
 * the check of the daemon's answer (struct p11p_welcome). Framing and deadlines are
 * transport.c's. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <msgpack.h>

#include "codec.h"
#include "debug.h"
#include "gen/versions.h"
#include "kept.h"
#include "link.h"
#include "transport.h"

/* ---- hello: {"p11p": MIN, "max": MAX, "features": [...], "ctx": bin(16), "pid": int,
 *      "prog": str[, "resume": {...}]}; the answer {"p11p": VERSION[, "features": [...],
 *      ...]} or with "error" ---- */

static int pack_key(msgpack_packer *pk, const char *key)
{
	size_t n = strlen(key);

	return msgpack_pack_str(pk, n) || msgpack_pack_str_body(pk, key, n);
}

static int pack_features(msgpack_packer *pk)
{
	int bad = msgpack_pack_array(pk, P11P_FEATURE_COUNT);

#define P11P_PACK_FEATURE(name, bit) bad = bad || pack_key(pk, #name);
	P11P_FEATURES(P11P_PACK_FEATURE)
#undef P11P_PACK_FEATURE
	return bad;
}

static int key_is(const msgpack_object *k, const char *key)
{
	size_t n = strlen(key);

	return k->type == MSGPACK_OBJECT_STR && k->via.str.size == n &&
	       memcmp(k->via.str.ptr, key, n) == 0;
}

/* The bit of a feature this library knows, or 0. */
static unsigned feature_bit(const msgpack_object *name)
{
	(void)name;
#define P11P_FEATURE_BIT(fname, bit)     \
	if (key_is(name, #fname))        \
		return 1u << (bit);
	P11P_FEATURES(P11P_FEATURE_BIT)
#undef P11P_FEATURE_BIT
	return 0;
}

/* The daemon's error, printable ASCII only, for the notice. */
static void copy_error(char *out, size_t size, const msgpack_object *error)
{
	static const char prefix[] = "the daemon refused the hello: ";
	size_t n = sizeof prefix - 1;

	memcpy(out, prefix, n);
	if (error->type == MSGPACK_OBJECT_STR) {
		for (uint32_t i = 0; i < error->via.str.size && n + 1 < size; i++) {
			unsigned char c = (unsigned char)error->via.str.ptr[i];

			out[n++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
		}
	}
	out[n] = '\0';
}

/* The daemon's answer: a version of ours, the features both know, or an error. */
static CK_RV check_welcome(const char *body, size_t len, struct p11p_welcome *w)
{
	msgpack_unpacked u;
	const msgpack_object *m;
	int has_version = 0, refused = 0;
	uint64_t version = 0, max_sessions = 0, hold_ms = 0;
	unsigned features = 0;

	if (p11p_msgpack_parse(body, len, &u) != 0) {
		snprintf(w->why, sizeof w->why, "the daemon's answer to the hello is malformed");
		return CKR_DEVICE_ERROR;
	}
	m = &u.data;
	if (m->type == MSGPACK_OBJECT_MAP) {
		for (uint32_t i = 0; i < m->via.map.size; i++) {
			const msgpack_object_kv *kv = &m->via.map.ptr[i];

			if (key_is(&kv->key, "p11p")) {
				has_version = kv->val.type == MSGPACK_OBJECT_POSITIVE_INTEGER;
				version = kv->val.via.u64;
			} else if (key_is(&kv->key, "features") &&
				   kv->val.type == MSGPACK_OBJECT_ARRAY) {
				for (uint32_t j = 0; j < kv->val.via.array.size; j++)
					features |= feature_bit(&kv->val.via.array.ptr[j]);
			} else if (key_is(&kv->key, "max_sessions") &&
				   kv->val.type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
				max_sessions = kv->val.via.u64;
			} else if (key_is(&kv->key, "hold_ms") &&
				   kv->val.type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
				hold_ms = kv->val.via.u64;
			} else if (key_is(&kv->key, "key") && kv->val.type == MSGPACK_OBJECT_BIN &&
				   kv->val.via.bin.size == sizeof w->key) {
				memcpy(w->key, kv->val.via.bin.ptr, sizeof w->key);
				w->has_key = 1;
			} else if (key_is(&kv->key, "error") && !refused) {
				refused = 1;
				copy_error(w->why, sizeof w->why, &kv->val);
			}
		}
	}
	msgpack_unpacked_destroy(&u);
	if (refused) {
		p11p_debug("the daemon refused the connection");
		return CKR_DEVICE_ERROR;
	}
	if (!has_version || version < P11P_PROTOCOL_MIN || version > P11P_PROTOCOL_MAX) {
		p11p_debug("the daemon answered the hello with another protocol version");
		if (has_version)
			snprintf(w->why, sizeof w->why,
				 "the daemon chose protocol version %llu, this library speaks %u..%u",
				 (unsigned long long)version, (unsigned)P11P_PROTOCOL_MIN,
				 (unsigned)P11P_PROTOCOL_MAX);
		else
			snprintf(w->why, sizeof w->why, "the daemon's answer to the hello is malformed");
		return CKR_DEVICE_ERROR;
	}
	w->version = (unsigned)version;
	w->features = features;
	w->max_sessions = max_sessions > 0xffffffffu ? 0xffffffffu : (unsigned long)max_sessions;
	w->hold_ms = hold_ms > 3600000u ? 3600000u : (unsigned long)hold_ms;
	return CKR_OK;
}

CK_RV p11p_hello(int fd, const unsigned char ctx[P11P_CTX_SIZE], int64_t deadline,
		 struct p11p_welcome *welcome)
{
	static const char header[P11P_FRAME_HEADER];
	const char *prog = program_invocation_name ? program_invocation_name : "";
	msgpack_sbuffer sb, resume;
	msgpack_packer pk;
	char *body = NULL;
	size_t len = 0;
	CK_RV rv = CKR_HOST_MEMORY;
	int bad, kept;

	memset(welcome, 0, sizeof *welcome);
	/* what the library keeps for a daemon that lost its state, when it keeps a key */
	msgpack_sbuffer_init(&resume);
	msgpack_packer_init(&pk, &resume, msgpack_sbuffer_write);
	kept = p11p_kept_pack(&pk);
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	bad = kept < 0 || msgpack_sbuffer_write(&sb, header, sizeof header) ||
	      msgpack_pack_map(&pk, kept > 0 ? 7 : 6) ||
	      pack_key(&pk, "p11p") || msgpack_pack_uint64(&pk, P11P_PROTOCOL_MIN) ||
	      pack_key(&pk, "max") || msgpack_pack_uint64(&pk, P11P_PROTOCOL_MAX) ||
	      pack_key(&pk, "features") || pack_features(&pk) ||
	      pack_key(&pk, "ctx") || msgpack_pack_bin(&pk, P11P_CTX_SIZE) ||
	      msgpack_pack_bin_body(&pk, ctx, P11P_CTX_SIZE) ||
	      pack_key(&pk, "pid") || msgpack_pack_uint64(&pk, (uint64_t)getpid()) ||
	      pack_key(&pk, "prog") || msgpack_pack_str(&pk, strlen(prog)) ||
	      msgpack_pack_str_body(&pk, prog, strlen(prog)) ||
	      (kept > 0 && msgpack_sbuffer_write(&sb, resume.data, resume.size));
	if (!bad)
		rv = p11p_send_frame(fd, sb.data, sb.size, deadline);
	/* a PIN may be in them. No freed copy holds one: `resume` stays within its first
	 * 8 KB (16 PINs of 256 bytes at most), and `sb` grows before that part goes in */
	if (resume.data != NULL)
		explicit_bzero(resume.data, resume.size);
	if (sb.data != NULL)
		explicit_bzero(sb.data, sb.size);
	msgpack_sbuffer_destroy(&resume);
	msgpack_sbuffer_destroy(&sb);
	if (rv == CKR_OK)
		rv = p11p_recv_frame(fd, &body, &len, deadline);
	if (rv == CKR_OK)
		rv = check_welcome(body, len, welcome);
	free(body);
	return rv;
}
