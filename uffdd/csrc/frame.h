/*
 * frame.h: the peer protocol's frame layout (docs/peer-protocol.md), for the C fast paths.
 * uffdd/peer/protocol/frames.py is the reference; the values are checked against it at import.
 */
#ifndef UFFDD_CSRC_FRAME_H
#define UFFDD_CSRC_FRAME_H

#include <stdint.h>
#include <string.h>

#define FRAME_HEADER 24
#define FRAME_DESC 8
#define FRAME_BLOCK 4096
#define FRAME_BLOCK_SHIFT 12
#define FRAME_TAG 16
#define FRAME_FLAG_TAGGED 0x01
#define FRAME_MAX_ERROR 1024
#define FRAME_MAX_HELLO 297 /* the fixed part, then a name of up to 255 bytes */
#define FRAME_MAX_AUTH 32

enum frame_type { F_HELLO = 0x01, F_CHALLENGE = 0x02, F_AUTH = 0x03, F_WELCOME = 0x04, F_READ = 0x10,
		  F_DATA = 0x11, F_PING = 0x20, F_PONG = 0x21, F_ERROR = 0x7F };
enum frame_encoding { ENC_RAW = 0, ENC_ZERO = 1, ENC_LZ4 = 2 };
enum frame_error { E_BAD_FRAME = 1, E_UNKNOWN_TYPE = 2, E_BAD_LENGTH = 3, E_BAD_STATE = 4, E_BAD_ID = 5,
		   E_OUT_OF_RANGE = 6, E_TOO_MANY_REQUESTS = 7, E_IO_ERROR = 12, E_TAMPERED = 16 };

struct frame_header {
	uint8_t type, flags;
	uint16_t count;
	uint32_t id;
	uint64_t offset;
	uint32_t length, aux;
};

static inline void frame_put_header(uint8_t *p, const struct frame_header *h)
{
	p[0] = h->type;
	p[1] = h->flags;
	p[2] = (uint8_t)h->count;
	p[3] = (uint8_t)(h->count >> 8);
	for (int i = 0; i < 4; i++)
		p[4 + i] = (uint8_t)(h->id >> (8 * i));
	for (int i = 0; i < 8; i++)
		p[8 + i] = (uint8_t)(h->offset >> (8 * i));
	for (int i = 0; i < 4; i++)
		p[16 + i] = (uint8_t)(h->length >> (8 * i));
	for (int i = 0; i < 4; i++)
		p[20 + i] = (uint8_t)(h->aux >> (8 * i));
}

static inline void frame_get_header(const uint8_t *p, struct frame_header *h)
{
	h->type = p[0];
	h->flags = p[1];
	h->count = (uint16_t)(p[2] | p[3] << 8);
	h->id = 0;
	h->offset = 0;
	h->length = 0;
	h->aux = 0;
	for (int i = 0; i < 4; i++)
		h->id |= (uint32_t)p[4 + i] << (8 * i);
	for (int i = 0; i < 8; i++)
		h->offset |= (uint64_t)p[8 + i] << (8 * i);
	for (int i = 0; i < 4; i++)
		h->length |= (uint32_t)p[16 + i] << (8 * i);
	for (int i = 0; i < 4; i++)
		h->aux |= (uint32_t)p[20 + i] << (8 * i);
}

/* The 96-bit nonce of frame number seq: four zero bytes, then seq as u64 little endian. */
static inline void frame_nonce(uint64_t seq, uint8_t nonce[12])
{
	memset(nonce, 0, 4);
	for (int i = 0; i < 8; i++)
		nonce[4 + i] = (uint8_t)(seq >> (8 * i));
}

#endif
