/* p11p — the strict first pass over one msgpack object, shared by every C decoder of the
 * wire protocol (the client's reply decoding, client/codec.c; the helper's data plane,
 * helper/fast_codec.c): it walks the bytes before msgpack-c allocates for them. Every
 * length must fit in the bytes that are left, and every container's element count too
 * (an element takes at least one byte), so a hostile length never makes a decoder
 * allocate more than a small multiple of the frame; truncation and trailing bytes are
 * caught here (protocol/README.md, "Framing"). */
#ifndef P11P_PRESCAN_H
#define P11P_PRESCAN_H

#include <stddef.h>
#include <stdint.h>

static inline uint64_t p11p_read_be(const uint8_t *p, size_t n)
{
	uint64_t v = 0;

	for (size_t i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return v;
}

/* 0 when [p, p+len) holds exactly one msgpack object whose lengths all fit; else -1. */
static inline int p11p_prescan(const uint8_t *p, size_t len)
{
	size_t pos = 0;
	uint64_t pending = 1;

	while (pending > 0) {
		if (pos >= len)
			return -1;
		uint8_t b = p[pos++];
		uint64_t skip = 0, items = 0;
		size_t lenbytes = 0;
		int kind = 0; /* 0 fixed size, 1 bytes, 2 ext, 3 array, 4 map */

		pending--;
		if (b <= 0x7f || b >= 0xe0) {
			/* fixint */
		} else if (b <= 0x8f) {
			items = 2u * (b & 0x0fu);
		} else if (b <= 0x9f) {
			items = b & 0x0fu;
		} else if (b <= 0xbf) {
			skip = b & 0x1fu;
		} else {
			switch (b) {
			case 0xc0: case 0xc2: case 0xc3: break;
			case 0xc4: case 0xd9: lenbytes = 1; kind = 1; break;
			case 0xc5: case 0xda: lenbytes = 2; kind = 1; break;
			case 0xc6: case 0xdb: lenbytes = 4; kind = 1; break;
			case 0xc7: lenbytes = 1; kind = 2; break;
			case 0xc8: lenbytes = 2; kind = 2; break;
			case 0xc9: lenbytes = 4; kind = 2; break;
			case 0xca: case 0xce: case 0xd2: skip = 4; break;
			case 0xcb: case 0xcf: case 0xd3: skip = 8; break;
			case 0xcc: case 0xd0: skip = 1; break;
			case 0xcd: case 0xd1: skip = 2; break;
			case 0xd4: skip = 2; break;
			case 0xd5: skip = 3; break;
			case 0xd6: skip = 5; break;
			case 0xd7: skip = 9; break;
			case 0xd8: skip = 17; break;
			case 0xdc: lenbytes = 2; kind = 3; break;
			case 0xdd: lenbytes = 4; kind = 3; break;
			case 0xde: lenbytes = 2; kind = 4; break;
			case 0xdf: lenbytes = 4; kind = 4; break;
			default: return -1; /* 0xc1: never used */
			}
		}
		if (lenbytes) {
			if (len - pos < lenbytes)
				return -1;
			uint64_t n = p11p_read_be(p + pos, lenbytes);
			pos += lenbytes;
			if (kind == 1)
				skip = n;
			else if (kind == 2)
				skip = n + 1; /* the ext type byte */
			else if (kind == 3)
				items = n;
			else
				items = 2 * n;
		}
		if (skip > len - pos)
			return -1;
		pos += skip;
		pending += items;
		if (pending > len - pos)
			return -1;
	}
	return pos == len ? 0 : -1;
}

#endif
