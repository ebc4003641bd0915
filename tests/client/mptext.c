/* p11p client tests — msgpack as text (see mptext.h). */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mptext.h"

struct parser {
	const char *p;
	msgpack_packer pk;
	msgpack_sbuffer *out;
};

static void skip_ws(struct parser *ps)
{
	while (isspace((unsigned char)*ps->p) || *ps->p == ',' || *ps->p == ':')
		ps->p++;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* h"..." or x"...": the bytes, malloc'd */
static int parse_hex(struct parser *ps, unsigned char **bytes, size_t *len)
{
	const char *start = ps->p + 2, *end = strchr(start, '"');
	size_t n;

	if (ps->p[1] != '"' || end == NULL || (end - start) % 2)
		return -1;
	n = (size_t)(end - start) / 2;
	*bytes = malloc(n + 1);
	for (size_t i = 0; i < n; i++) {
		int hi = hexval(start[2 * i]), lo = hexval(start[2 * i + 1]);

		if (hi < 0 || lo < 0) {
			free(*bytes);
			return -1;
		}
		(*bytes)[i] = (unsigned char)(hi << 4 | lo);
	}
	*len = n;
	ps->p = end + 1;
	return 0;
}

static int parse_value(struct parser *ps);

static int parse_seq(struct parser *ps, char close, int map)
{
	size_t count = 0;
	msgpack_sbuffer inner;
	msgpack_sbuffer *outer = ps->out;
	int rc = 0;

	/* parse into a side buffer to count, then emit the header and the body */
	msgpack_sbuffer_init(&inner);
	ps->out = &inner;
	msgpack_packer_init(&ps->pk, &inner, msgpack_sbuffer_write);
	for (;;) {
		skip_ws(ps);
		if (*ps->p == close) {
			ps->p++;
			break;
		}
		if (*ps->p == '\0' || parse_value(ps) != 0) {
			rc = -1;
			break;
		}
		count++;
	}
	ps->out = outer;
	msgpack_packer_init(&ps->pk, outer, msgpack_sbuffer_write);
	if (rc == 0) {
		if (map)
			msgpack_pack_map(&ps->pk, count / 2);
		else
			msgpack_pack_array(&ps->pk, count);
		msgpack_sbuffer_write(outer, inner.data, inner.size);
	}
	msgpack_sbuffer_destroy(&inner);
	return rc;
}

static int parse_value(struct parser *ps)
{
	unsigned char *bytes;
	size_t len;

	skip_ws(ps);
	if (strncmp(ps->p, "nil", 3) == 0) {
		ps->p += 3;
		return msgpack_pack_nil(&ps->pk);
	}
	if (strncmp(ps->p, "true", 4) == 0) {
		ps->p += 4;
		return msgpack_pack_true(&ps->pk);
	}
	if (strncmp(ps->p, "false", 5) == 0) {
		ps->p += 5;
		return msgpack_pack_false(&ps->pk);
	}
	if (*ps->p == '[') {
		ps->p++;
		return parse_seq(ps, ']', 0);
	}
	if (*ps->p == '{') {
		ps->p++;
		return parse_seq(ps, '}', 1);
	}
	if (*ps->p == '"') {
		const char *end = strchr(ps->p + 1, '"');

		if (end == NULL)
			return -1;
		len = (size_t)(end - ps->p - 1);
		msgpack_pack_str(&ps->pk, len);
		msgpack_pack_str_body(&ps->pk, ps->p + 1, len);
		ps->p = end + 1;
		return 0;
	}
	if ((*ps->p == 'h' || *ps->p == 'x') && ps->p[1] == '"') {
		int raw = *ps->p == 'x';

		if (parse_hex(ps, &bytes, &len) != 0)
			return -1;
		if (raw) {
			msgpack_sbuffer_write(ps->out, (const char *)bytes, len);
		} else {
			msgpack_pack_bin(&ps->pk, len);
			msgpack_pack_bin_body(&ps->pk, bytes, len);
		}
		free(bytes);
		return 0;
	}
	if (*ps->p == '-' || isdigit((unsigned char)*ps->p)) {
		const char *start = ps->p;
		char *end;

		ps->p += *ps->p == '-';
		while (isdigit((unsigned char)*ps->p) || *ps->p == 'x' || isxdigit((unsigned char)*ps->p))
			ps->p++;
		if (*ps->p == '.') {
			double d = strtod(start, &end);

			ps->p = end;
			return msgpack_pack_double(&ps->pk, d);
		}
		if (*start == '-')
			return msgpack_pack_int64(&ps->pk, strtoll(start, &end, 0));
		return msgpack_pack_uint64(&ps->pk, strtoull(start, &end, 0));
	}
	return -1;
}

int mp_from_text(const char *text, msgpack_sbuffer *out)
{
	struct parser ps = { .p = text, .out = out };

	msgpack_packer_init(&ps.pk, out, msgpack_sbuffer_write);
	while (1) {
		skip_ws(&ps);
		if (*ps.p == '\0')
			return 0;
		if (parse_value(&ps) != 0)
			return -1;
	}
}

static void put(char **buf, size_t *size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void put(char **buf, size_t *size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(*buf, *size, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= *size)
		n = (int)(*size ? *size - 1 : 0);
	*buf += n;
	*size -= (size_t)n;
}

static void to_text(const msgpack_object *o, char **buf, size_t *size)
{
	switch (o->type) {
	case MSGPACK_OBJECT_NIL: put(buf, size, "nil"); break;
	case MSGPACK_OBJECT_BOOLEAN: put(buf, size, o->via.boolean ? "true" : "false"); break;
	case MSGPACK_OBJECT_POSITIVE_INTEGER: put(buf, size, "%llu", (unsigned long long)o->via.u64); break;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER: put(buf, size, "%lld", (long long)o->via.i64); break;
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64: put(buf, size, "%g", o->via.f64); break;
	case MSGPACK_OBJECT_STR: put(buf, size, "\"%.*s\"", (int)o->via.str.size, o->via.str.ptr); break;
	case MSGPACK_OBJECT_BIN:
		put(buf, size, "h\"");
		for (uint32_t i = 0; i < o->via.bin.size; i++)
			put(buf, size, "%02x", (unsigned char)o->via.bin.ptr[i]);
		put(buf, size, "\"");
		break;
	case MSGPACK_OBJECT_ARRAY:
		put(buf, size, "[");
		for (uint32_t i = 0; i < o->via.array.size; i++) {
			if (i)
				put(buf, size, ",");
			to_text(&o->via.array.ptr[i], buf, size);
		}
		put(buf, size, "]");
		break;
	case MSGPACK_OBJECT_MAP:
		put(buf, size, "{");
		for (uint32_t i = 0; i < o->via.map.size; i++) {
			if (i)
				put(buf, size, ",");
			to_text(&o->via.map.ptr[i].key, buf, size);
			put(buf, size, ":");
			to_text(&o->via.map.ptr[i].val, buf, size);
		}
		put(buf, size, "}");
		break;
	default: put(buf, size, "?"); break;
	}
}

void mp_to_text(const msgpack_object *o, char *buf, size_t size)
{
	if (size == 0)
		return;
	buf[0] = '\0';
	to_text(o, &buf, &size);
}
