/*
 * wire.h: the peer protocol's block checksums and frame tags, for C fast paths.
 *
 * The peer protocol (docs/peer-protocol.md) checks every 4 KiB block with a crc32c and, on an
 * authenticated connection, every frame with a 16-byte tag. A C fast path (a server answering
 * demand reads, a client receiving pages into guest memory) must compute exactly what the Python
 * side computes, without calling into Python:
 *
 * - wire_crc32c(): CRC-32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78), register
 *   preset to all ones and inverted at the end, chained like the crc32c package's
 *   crc32c(data, value): wire_crc32c(wire_crc32c(0, a), b) == wire_crc32c(0, a + b). On x86-64 it
 *   uses the SSE4.2 CRC32 instruction on three interleaved streams joined with PCLMULQDQ (chosen
 *   at run time), else one stream of CRC32 instructions, else eight tables (slicing by 8).
 * - wire_aead_tag() / wire_aead_verify(): the ChaCha20-Poly1305 AEAD of RFC 8439 with an empty
 *   plaintext, over an AAD given as pieces (header, descriptor table, payload may lie in different
 *   buffers): the tag that ChaCha20Poly1305(key).encrypt(nonce, b"", aad) returns. Verification
 *   compares in constant time.
 * - the building blocks: the ChaCha20 block function and a streaming Poly1305 (44-bit limbs in
 *   64-bit words, products in unsigned __int128, four blocks at a time).
 *
 * Everything here is static inline and allocation free: include the header where it is needed.
 * The crc32c tables and CPU features are set up by a constructor when the object that includes
 * this header is loaded, before any of its code can run.
 */
#ifndef UFFDD_WIRE_H
#define UFFDD_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

/* WIRE_PORTABLE leaves the x86 paths out (to build and test the portable one there). */
#if defined(__x86_64__) && !defined(WIRE_PORTABLE)
#include <nmmintrin.h>
#include <wmmintrin.h>
#define WIRE_X86_64 1
#else
#define WIRE_X86_64 0
#endif

#if !defined(__BYTE_ORDER__) || (__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__ && \
				  __BYTE_ORDER__ != __ORDER_BIG_ENDIAN__)
#error "wire.h needs a little or big endian target"
#endif

#if !defined(__SIZEOF_INT128__)
#error "wire.h needs unsigned __int128 (a 64-bit target)"
#endif

#define WIRE_CRC32C_POLY 0x82F63B78u
#define WIRE_KEY_SIZE 32
#define WIRE_NONCE_SIZE 12
#define WIRE_TAG_SIZE 16

/* ---- little-endian loads and stores (any alignment) ---- */

static inline uint32_t wire_load_le32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap32(v);
#endif
	return v;
}

static inline uint64_t wire_load_le64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap64(v);
#endif
	return v;
}

static inline void wire_store_le32(uint8_t *p, uint32_t v)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap32(v);
#endif
	memcpy(p, &v, sizeof(v));
}

static inline void wire_store_le64(uint8_t *p, uint64_t v)
{
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap64(v);
#endif
	memcpy(p, &v, sizeof(v));
}

/* Zero secrets on the stack; the empty asm that may read them keeps the compiler from dropping it. */
static inline void wire_wipe(void *p, size_t n)
{
	memset(p, 0, n);
	__asm__ __volatile__("" : : "r"(p) : "memory");
}

/* ---- crc32c ---- */

/*
 * Three streams of LONG (or SHORT) bytes each are summed at once, then joined: the first
 * stream's crc is moved past the other two by multiplying it with x^(8 * 2n) mod P, the second
 * with x^(8 * n). Both sizes are multiples of 8; 3 * 1360 + 16 is one 4 KiB block.
 */
#define WIRE_CRC_LONG 1360
#define WIRE_CRC_SHORT 256

static uint32_t wire_crc_table[8][256];
#if WIRE_X86_64
/* x^(8n - 33) mod P for n = LONG, 2 LONG, SHORT, 2 SHORT (see wire_crc_shift_const). */
static uint32_t wire_crc_shift[4];
static int wire_have_crc_insn, wire_have_clmul;
#endif

/* x^k mod P, reflected (bit 31 is x^0): multiplying by x is a right shift, folding x^32 to P. */
static inline uint32_t wire_crc_xpow(unsigned k)
{
	uint32_t v = 0x80000000u;

	while (k--)
		v = (v & 1) ? (v >> 1) ^ WIRE_CRC32C_POLY : v >> 1;
	return v;
}

/*
 * The constant that moves a crc past n bytes with one carry-less multiply: the 64-bit product
 * of two reflected 32-bit polynomials is a*b*x as a reflected 64-bit polynomial, and the CRC32
 * instruction on it from 0 multiplies by x^32 more: (a * x^(8n - 33)) * x * x^32 = a * x^(8n).
 */
static inline uint32_t wire_crc_shift_const(unsigned n)
{
	return wire_crc_xpow(8 * n - 33);
}

__attribute__((constructor)) static void wire_crc_setup(void)
{
	for (unsigned i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = (c & 1) ? (c >> 1) ^ WIRE_CRC32C_POLY : c >> 1;
		wire_crc_table[0][i] = c;
	}
	for (unsigned i = 0; i < 256; i++)
		for (int t = 1; t < 8; t++) {
			uint32_t prev = wire_crc_table[t - 1][i];

			wire_crc_table[t][i] = (prev >> 8) ^ wire_crc_table[0][prev & 0xff];
		}
#if WIRE_X86_64
	wire_crc_shift[0] = wire_crc_shift_const(WIRE_CRC_LONG);
	wire_crc_shift[1] = wire_crc_shift_const(2 * WIRE_CRC_LONG);
	wire_crc_shift[2] = wire_crc_shift_const(WIRE_CRC_SHORT);
	wire_crc_shift[3] = wire_crc_shift_const(2 * WIRE_CRC_SHORT);
	__builtin_cpu_init();
	wire_have_crc_insn = __builtin_cpu_supports("sse4.2");
	wire_have_clmul = wire_have_crc_insn && __builtin_cpu_supports("pclmul");
#endif
}

/* The raw register (no presetting, no final inversion), eight bytes at a time through tables. */
static inline uint32_t wire_crc_soft(uint32_t crc, const uint8_t *p, size_t len)
{
	const uint32_t (*t)[256] = wire_crc_table;

	for (; len >= 8; p += 8, len -= 8) {
		uint64_t v = wire_load_le64(p) ^ crc;

		crc = t[7][v & 0xff] ^ t[6][(v >> 8) & 0xff] ^ t[5][(v >> 16) & 0xff] ^
		      t[4][(v >> 24) & 0xff] ^ t[3][(v >> 32) & 0xff] ^ t[2][(v >> 40) & 0xff] ^
		      t[1][(v >> 48) & 0xff] ^ t[0][v >> 56];
	}
	while (len--)
		crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xff];
	return crc;
}

#if WIRE_X86_64
__attribute__((target("sse4.2"))) static inline uint32_t wire_crc_insn(uint32_t crc, const uint8_t *p,
								      size_t len)
{
	uint64_t c = crc;

	for (; len >= 8; p += 8, len -= 8)
		c = _mm_crc32_u64(c, wire_load_le64(p));
	crc = (uint32_t)c;
	while (len--)
		crc = _mm_crc32_u8(crc, *p++);
	return crc;
}

/* One step of 3 * n bytes: three independent streams, then joined (see WIRE_CRC_LONG). */
__attribute__((target("sse4.2,pclmul"))) static inline uint32_t
wire_crc_3way(uint32_t crc, const uint8_t *p, size_t n, uint32_t k_n, uint32_t k_2n)
{
	uint64_t a = crc, b = 0, c = 0;
	__m128i ta, tb;

	for (size_t i = 0; i < n; i += 8) {
		a = _mm_crc32_u64(a, wire_load_le64(p + i));
		b = _mm_crc32_u64(b, wire_load_le64(p + n + i));
		c = _mm_crc32_u64(c, wire_load_le64(p + 2 * n + i));
	}
	ta = _mm_clmulepi64_si128(_mm_cvtsi64_si128((long long)a), _mm_cvtsi64_si128((long long)k_2n), 0);
	tb = _mm_clmulepi64_si128(_mm_cvtsi64_si128((long long)b), _mm_cvtsi64_si128((long long)k_n), 0);
	a = (uint64_t)_mm_cvtsi128_si64(_mm_xor_si128(ta, tb));
	return (uint32_t)_mm_crc32_u64(0, a) ^ (uint32_t)c;
}

__attribute__((target("sse4.2,pclmul"))) static inline uint32_t wire_crc_insn3(uint32_t crc, const uint8_t *p,
									     size_t len)
{
	for (; len >= 3 * WIRE_CRC_LONG; p += 3 * WIRE_CRC_LONG, len -= 3 * WIRE_CRC_LONG)
		crc = wire_crc_3way(crc, p, WIRE_CRC_LONG, wire_crc_shift[0], wire_crc_shift[1]);
	for (; len >= 3 * WIRE_CRC_SHORT; p += 3 * WIRE_CRC_SHORT, len -= 3 * WIRE_CRC_SHORT)
		crc = wire_crc_3way(crc, p, WIRE_CRC_SHORT, wire_crc_shift[2], wire_crc_shift[3]);
	return wire_crc_insn(crc, p, len);
}
#endif

/* Portable path only (tables), whatever the CPU: for tests that compare the paths. */
static inline uint32_t wire_crc32c_portable(uint32_t crc, const void *buf, size_t len)
{
	return len ? ~wire_crc_soft(~crc, buf, len) : crc;
}

/* crc32c of buf[0:len] continuing from crc (0 to start), as crc32c.crc32c(buf, crc) computes. */
static inline uint32_t wire_crc32c(uint32_t crc, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	if (!len)
		return crc;
#if WIRE_X86_64
	if (wire_have_clmul)
		return ~wire_crc_insn3(~crc, p, len);
	if (wire_have_crc_insn)
		return ~wire_crc_insn(~crc, p, len);
#endif
	return ~wire_crc_soft(~crc, p, len);
}

/* ---- ChaCha20 (RFC 8439, 2.3) ---- */

static inline uint32_t wire_rotl32(uint32_t v, int n)
{
	return (v << n) | (v >> (32 - n));
}

#define WIRE_QR(x, a, b, c, d)                                     \
	do {                                                       \
		x[a] += x[b]; x[d] = wire_rotl32(x[d] ^ x[a], 16); \
		x[c] += x[d]; x[b] = wire_rotl32(x[b] ^ x[c], 12); \
		x[a] += x[b]; x[d] = wire_rotl32(x[d] ^ x[a], 8);  \
		x[c] += x[d]; x[b] = wire_rotl32(x[b] ^ x[c], 7);  \
	} while (0)

/* The 64-byte key stream block for (key, counter, nonce). */
static inline void wire_chacha20_block(const uint8_t key[WIRE_KEY_SIZE], uint32_t counter,
				       const uint8_t nonce[WIRE_NONCE_SIZE], uint8_t out[64])
{
	uint32_t in[16], x[16];

	in[0] = 0x61707865u; /* "expand 32-byte k" */
	in[1] = 0x3320646eu;
	in[2] = 0x79622d32u;
	in[3] = 0x6b206574u;
	for (int i = 0; i < 8; i++)
		in[4 + i] = wire_load_le32(key + 4 * i);
	in[12] = counter;
	for (int i = 0; i < 3; i++)
		in[13 + i] = wire_load_le32(nonce + 4 * i);
	memcpy(x, in, sizeof(x));
	for (int i = 0; i < 10; i++) {
		WIRE_QR(x, 0, 4, 8, 12);
		WIRE_QR(x, 1, 5, 9, 13);
		WIRE_QR(x, 2, 6, 10, 14);
		WIRE_QR(x, 3, 7, 11, 15);
		WIRE_QR(x, 0, 5, 10, 15);
		WIRE_QR(x, 1, 6, 11, 12);
		WIRE_QR(x, 2, 7, 8, 13);
		WIRE_QR(x, 3, 4, 9, 14);
	}
	for (int i = 0; i < 16; i++)
		wire_store_le32(out + 4 * i, x[i] + in[i]);
	wire_wipe(in, sizeof(in));
	wire_wipe(x, sizeof(x));
}

#undef WIRE_QR

/* ---- Poly1305 (RFC 8439, 2.5) ---- */

/*
 * Numbers mod p = 2^130 - 5 are kept as three limbs of 44, 44 and 42 bits (h0 + h1 2^44 +
 * h2 2^88) in 64-bit words, products in unsigned __int128. A product's part at 2^132 and above
 * folds back in times 20 (2^130 = 5 mod p), so a multiplier carries s = 20 r1, 20 r2 along.
 * Blocks go WIRE_POLY_WAYS at a time: h = (h + m1) r^4 + m2 r^3 + m3 r^2 + m4 r, four
 * independent products and one carry chain, instead of four multiplications in a row.
 */
#define WIRE_POLY_WAYS 4 /* as unrolled in wire_poly1305_blocks */
#define WIRE_M44 0xfffffffffffull
#define WIRE_M42 0x3ffffffffffull

typedef unsigned __int128 wire_u128;

struct wire_poly1305_mul {
	uint64_t r[3], s[2];
};

struct wire_poly1305 {
	struct wire_poly1305_mul pow[WIRE_POLY_WAYS]; /* r^(WAYS - i) */
	uint64_t h[3];
	uint64_t pad[2];
	uint8_t buf[16];
	size_t used;
};

/*
 * d += a x. With a's limbs below 2^46, x's r below 2^45 and s below 2^50, each product is below
 * 2^96: four calls (twelve products a sum) stay below 2^100, and d >> 42 fits in 64 bits.
 */
static inline void wire_poly_mul_add(wire_u128 d[3], const uint64_t a[3], const struct wire_poly1305_mul *x)
{
	d[0] += (wire_u128)a[0] * x->r[0] + (wire_u128)a[1] * x->s[1] + (wire_u128)a[2] * x->s[0];
	d[1] += (wire_u128)a[0] * x->r[1] + (wire_u128)a[1] * x->r[0] + (wire_u128)a[2] * x->s[1];
	d[2] += (wire_u128)a[0] * x->r[2] + (wire_u128)a[1] * x->r[1] + (wire_u128)a[2] * x->r[0];
}

/* h = d partly reduced: h0 < 2^44, h1 < 2^44 + 2^17, h2 < 2^42. */
static inline void wire_poly_carry(uint64_t h[3], wire_u128 d[3])
{
	uint64_t c;

	d[1] += (uint64_t)(d[0] >> 44);
	d[2] += (uint64_t)(d[1] >> 44);
	c = (uint64_t)(d[2] >> 42); /* < 2^58: times 5 fits */
	h[0] = ((uint64_t)d[0] & WIRE_M44) + c * 5;
	h[1] = ((uint64_t)d[1] & WIRE_M44) + (h[0] >> 44);
	h[0] &= WIRE_M44;
	h[2] = (uint64_t)d[2] & WIRE_M42;
}

static inline void wire_poly_set_mul(struct wire_poly1305_mul *x, const uint64_t r[3])
{
	x->r[0] = r[0];
	x->r[1] = r[1];
	x->r[2] = r[2];
	x->s[0] = 20 * r[1];
	x->s[1] = 20 * r[2];
}

/* A 16-byte block as limbs, plus hibit 2^128 (1 for a whole block, 0 for the padded last one). */
static inline void wire_poly_load(uint64_t m[3], const uint8_t *p, uint64_t hibit)
{
	uint64_t t0 = wire_load_le64(p), t1 = wire_load_le64(p + 8);

	m[0] = t0 & WIRE_M44;
	m[1] = ((t0 >> 44) | (t1 << 20)) & WIRE_M44;
	m[2] = (t1 >> 24) | (hibit << 40);
}

static inline void wire_poly1305_init(struct wire_poly1305 *st, const uint8_t key[32])
{
	uint64_t lo = wire_load_le64(key) & 0x0ffffffc0fffffffull;
	uint64_t hi = wire_load_le64(key + 8) & 0x0ffffffc0ffffffcull;
	uint64_t r[3] = {lo & WIRE_M44, ((lo >> 44) | (hi << 20)) & WIRE_M44, hi >> 24};

	wire_poly_set_mul(&st->pow[WIRE_POLY_WAYS - 1], r);
	for (int i = WIRE_POLY_WAYS - 2; i >= 0; i--) {
		wire_u128 d[3] = {0, 0, 0};
		uint64_t rn[3];

		wire_poly_mul_add(d, st->pow[i + 1].r, &st->pow[WIRE_POLY_WAYS - 1]);
		wire_poly_carry(rn, d);
		wire_poly_set_mul(&st->pow[i], rn);
	}
	st->h[0] = st->h[1] = st->h[2] = 0;
	st->pad[0] = wire_load_le64(key + 16);
	st->pad[1] = wire_load_le64(key + 24);
	st->used = 0;
}

/* h = (h + m) r mod p (partly reduced) for each 16-byte block m. */
static inline void wire_poly1305_blocks(struct wire_poly1305 *st, const uint8_t *p, size_t nblocks,
					uint64_t hibit)
{
	const struct wire_poly1305_mul *r = &st->pow[WIRE_POLY_WAYS - 1];
	uint64_t h[3] = {st->h[0], st->h[1], st->h[2]};
	uint64_t m[3];

	for (; nblocks >= WIRE_POLY_WAYS; nblocks -= WIRE_POLY_WAYS, p += 16 * WIRE_POLY_WAYS) {
		wire_u128 d[3] = {0, 0, 0};

		wire_poly_load(m, p, hibit);
		m[0] += h[0];
		m[1] += h[1];
		m[2] += h[2];
		wire_poly_mul_add(d, m, &st->pow[0]);
		wire_poly_load(m, p + 16, hibit);
		wire_poly_mul_add(d, m, &st->pow[1]);
		wire_poly_load(m, p + 32, hibit);
		wire_poly_mul_add(d, m, &st->pow[2]);
		wire_poly_load(m, p + 48, hibit);
		wire_poly_mul_add(d, m, &st->pow[3]);
		wire_poly_carry(h, d);
	}
	for (; nblocks; nblocks--, p += 16) {
		wire_u128 d[3] = {0, 0, 0};

		wire_poly_load(m, p, hibit);
		m[0] += h[0];
		m[1] += h[1];
		m[2] += h[2];
		wire_poly_mul_add(d, m, r);
		wire_poly_carry(h, d);
	}
	st->h[0] = h[0];
	st->h[1] = h[1];
	st->h[2] = h[2];
}

static inline void wire_poly1305_update(struct wire_poly1305 *st, const void *data, size_t len)
{
	const uint8_t *m = data;
	size_t n;

	if (!len)
		return;
	if (st->used) {
		n = 16 - st->used;
		if (n > len)
			n = len;
		memcpy(st->buf + st->used, m, n);
		st->used += n;
		m += n;
		len -= n;
		if (st->used < 16)
			return;
		wire_poly1305_blocks(st, st->buf, 1, 1);
		st->used = 0;
	}
	n = len / 16;
	if (n) {
		wire_poly1305_blocks(st, m, n, 1);
		m += 16 * n;
		len -= 16 * n;
	}
	if (len) {
		memcpy(st->buf, m, len);
		st->used = len;
	}
}

/* The tag, then the state is wiped. */
static inline void wire_poly1305_final(struct wire_poly1305 *st, uint8_t tag[16])
{
	uint64_t h0, h1, h2, g0, g1, g2, c, mask, lo, hi;
	wire_u128 t;

	if (st->used) {
		/* A last partial block: its bytes, a 1 byte, zeros, and no 2^128 bit. */
		st->buf[st->used] = 1;
		memset(st->buf + st->used + 1, 0, 15 - st->used);
		wire_poly1305_blocks(st, st->buf, 1, 0);
	}
	/* Carry until every limb fits its width: then h < 2^130 + 2^88 < 2p. */
	h0 = st->h[0];
	h1 = st->h[1];
	h2 = st->h[2] + (h1 >> 44);
	h1 &= WIRE_M44;
	h0 += (h2 >> 42) * 5;
	h2 &= WIRE_M42;
	h1 += h0 >> 44;
	h0 &= WIRE_M44;
	h2 += h1 >> 44;
	h1 &= WIRE_M44;
	/* g = h - p = h + 5 - 2^130; take it when it is not negative, without a branch. */
	g0 = h0 + 5;
	c = g0 >> 44;
	g0 &= WIRE_M44;
	g1 = h1 + c;
	c = g1 >> 44;
	g1 &= WIRE_M44;
	g2 = h2 + c - (1ull << 42);
	mask = (g2 >> 63) - 1; /* all ones when g >= 0 */
	h0 = (h0 & ~mask) | (g0 & mask);
	h1 = (h1 & ~mask) | (g1 & mask);
	h2 = (h2 & ~mask) | (g2 & mask);
	/* (h + s) mod 2^128 */
	lo = h0 | (h1 << 44);
	hi = (h1 >> 20) | (h2 << 24);
	t = (wire_u128)lo + st->pad[0];
	wire_store_le64(tag, (uint64_t)t);
	wire_store_le64(tag + 8, hi + st->pad[1] + (uint64_t)(t >> 64));
	wire_wipe(st, sizeof(*st));
}

/* ---- ChaCha20-Poly1305 with an empty plaintext (RFC 8439, 2.8) ---- */

/*
 * The Poly1305 key is the first half of ChaCha20 block 0; the MAC input is the AAD, zeros up to
 * a multiple of 16, then le64(AAD length) and le64(0), the length of the empty ciphertext.
 */
static inline void wire_aead_tag(const uint8_t key[WIRE_KEY_SIZE], const uint8_t nonce[WIRE_NONCE_SIZE],
				 const struct iovec *aad, int iovcnt, uint8_t tag[WIRE_TAG_SIZE])
{
	static const uint8_t zeros[16];
	struct wire_poly1305 st;
	uint8_t block[64], lengths[16];
	uint64_t total = 0;

	wire_chacha20_block(key, 0, nonce, block);
	wire_poly1305_init(&st, block);
	wire_wipe(block, sizeof(block));
	for (int i = 0; i < iovcnt; i++) {
		wire_poly1305_update(&st, aad[i].iov_base, aad[i].iov_len);
		total += aad[i].iov_len;
	}
	if (st.used)
		wire_poly1305_update(&st, zeros, 16 - st.used);
	wire_store_le64(lengths, total);
	wire_store_le64(lengths + 8, 0);
	wire_poly1305_update(&st, lengths, sizeof(lengths));
	wire_poly1305_final(&st, tag);
}

/* 0 when a and b are equal, -1 when not; the time taken does not depend on where they differ. */
static inline int wire_equal16(const uint8_t a[16], const uint8_t b[16])
{
	uint32_t d = 0;

	for (int i = 0; i < 16; i++)
		d |= (uint32_t)(a[i] ^ b[i]);
	return (int)((d - 1) >> 8 & 1) - 1;
}

/* 0 when tag is the AEAD tag of the AAD, -1 when it is not (compared in constant time). */
__attribute__((warn_unused_result)) static inline int
wire_aead_verify(const uint8_t key[WIRE_KEY_SIZE], const uint8_t nonce[WIRE_NONCE_SIZE], const struct iovec *aad,
		 int iovcnt, const uint8_t tag[WIRE_TAG_SIZE])
{
	uint8_t want[WIRE_TAG_SIZE];
	int rc;

	wire_aead_tag(key, nonce, aad, iovcnt, want);
	rc = wire_equal16(want, tag);
	wire_wipe(want, sizeof(want));
	return rc;
}

#endif /* UFFDD_WIRE_H */
